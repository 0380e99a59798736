"""The end of every benchmark driver: print its markdown table, and append it to a file."""


def emit(lines, markdown_path=None) -> None:
    text = "\n".join(lines) + "\n"
    print(text)
    if markdown_path:
        with open(markdown_path, "a") as f:
            f.write("\n" + text)
