"""The Python half of docker/smoke-test.sh (run with the host's Python 3.11, standard library only).

    smoke_checks.py requirements PYPROJECT          what the Dockerfile installs, one a line
    smoke_checks.py index FOLDER                    a PEP 503 index FOLDER/simple over its files
    smoke_checks.py files ROOTFS REPO WORKDIR       the image holds the package and no repo files
    smoke_checks.py caption RESPONSE PHOTO WORD     the /v1/captions answer names WORD
"""

import hashlib
import html
import json
import os
import pathlib
import re
import shutil
import sys

import tomllib

# The Dockerfile's first RUN (PyTorch from its own index), pinned as in pyproject.toml.
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]

# Everything under the image's WORKDIR must be one of these: the package with its model and its
# data, the training code and configs, the service with its page. `*` is one path segment.
ALLOWED = ["pyproject.toml", "README.md", "captioner/*.py", "captioner/weights/default.pt",
           "captioner/data/*.json", "training/*.py", "training/configs/*.yaml", "service/*.py",
           "service/static/*", "captioner.egg-info/*"]

# Folders of the repository whose files must not be anywhere in the image.
REPO_ONLY = ["tests", "examples", "benchmarks", "docs"]


def requirements(pyproject: str) -> None:
    project = tomllib.loads(pathlib.Path(pyproject).read_text())
    print("\n".join([*TORCH, *project["build-system"]["requires"], *project["project"]["dependencies"]]))


def index(folder: str) -> None:
    wheels = pathlib.Path(folder)
    simple = wheels / "simple"
    shutil.rmtree(simple, ignore_errors=True)
    projects: dict[str, list[str]] = {}
    for f in sorted(wheels.iterdir()):
        if f.is_file() and f.name.endswith((".whl", ".tar.gz", ".zip")):
            name = f.name.split("-")[0] if f.name.endswith(".whl") else f.name.rsplit("-", 1)[0]
            projects.setdefault(re.sub(r"[-_.]+", "-", name).lower(), []).append(f.name)
    for project, files in projects.items():
        (simple / project).mkdir(parents=True)
        links = "".join(f'<a href="../../{html.escape(n)}">{html.escape(n)}</a><br>\n' for n in files)
        (simple / project / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
    links = "".join(f'<a href="{p}/">{p}</a><br>\n' for p in sorted(projects))
    (simple / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
    print(f"ok: local index of {sum(map(len, projects.values()))} files ({len(projects)} projects)")


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files(rootfs: str, repo: str, workdir: str) -> None:
    root, repo_dir = pathlib.Path(rootfs), pathlib.Path(repo)
    app = root / workdir.lstrip("/")
    allowed = re.compile("|".join(re.escape(a).replace(r"\*", "[^/]+") for a in ALLOWED))
    listed = sorted(str(p.relative_to(app)) for p in app.rglob("*") if not p.is_dir())
    stray = [f for f in listed if not allowed.fullmatch(f)]
    if stray:
        sys.exit(f"FAIL: {workdir} holds files that are not the package's: {stray[:20]}")
    print(f"ok: {workdir} holds {len(listed)} files, each of the package, its model or the service: "
          f"{' '.join(sorted(os.listdir(app)))}")

    # No file of the repository's tests, examples, benchmarks or docs anywhere in the image: same
    # size, then same SHA-256 (files of a few bytes, an empty __init__.py, say, prove nothing).
    theirs: dict[int, dict[str, str]] = {}
    for folder in REPO_ONLY:
        for p in (repo_dir / folder).rglob("*"):
            if p.is_file() and "__pycache__" not in p.parts and p.stat().st_size > 64:
                theirs.setdefault(p.stat().st_size, {})[_sha256(p)] = str(p.relative_to(repo_dir))
    found, scanned = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d not in ("proc", "sys", "dev")]
        for name in filenames:
            p = pathlib.Path(dirpath, name)
            if p.is_symlink() or not p.is_file():
                continue
            scanned += 1
            candidates = theirs.get(p.stat().st_size)
            if candidates and (match := candidates.get(_sha256(p))):
                found.append(f"/{p.relative_to(root)} (= {match})")
    if found:
        sys.exit(f"FAIL: the image holds files of the repository's {', '.join(REPO_ONLY)}: {found[:20]}")
    print(f"ok: none of the repository's {sum(map(len, theirs.values()))} files in {', '.join(REPO_ONLY)} "
          f"among the image's {scanned} files")


def caption(response: str, photo: str, word: str) -> None:
    body = json.loads(pathlib.Path(response).read_text())
    image = body["images"][0]
    if word not in image["caption"].split():
        sys.exit(f"FAIL: the caption of {photo}, {image['caption']!r}, does not say {word!r}: {body}")
    print(f"ok: POST /v1/captions {photo}: {image['caption']!r} (score {image['score']:.3f}, "
          f"model {body['model']})")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"requirements": requirements, "index": index, "files": files, "caption": caption}[command](*args)
