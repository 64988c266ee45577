"""`captioner caption-folder`: placeholder until the folder command lands (issue 5)."""


def register(commands) -> None:
    return None
