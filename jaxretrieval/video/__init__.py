"""Video near-duplicate search: the `video:PATH` source (frames sampled at a rate and at
scene changes, `decode`), and search by image or clip with temporal Hough voting over
(video, offset) pairs (`voting`). docs/video.md describes both."""
