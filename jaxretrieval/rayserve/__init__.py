"""The service over Ray Serve (`serve --ray`, docs/ray.md): `start_ray_backend` deploys a
workdir's index shards and model and returns the Retriever that the service's app serves.

Modules: deployments (what runs in the cluster: shard replicas, shard writers, the
embedder) and backend (the ingress's side: RemoteIndex, RemoteEmbedder, RayRetriever,
start_ray_backend). Both need Ray (`pip install -e ".[ray]"`); nothing else imports them.
"""
