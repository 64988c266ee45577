"""`captioner serve`: placeholder until the service lands (issue 4)."""


def register(commands) -> None:
    return None
