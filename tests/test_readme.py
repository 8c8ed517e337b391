"""Every command in README.md is run here, so the README cannot rot.

The ```bash blocks of the README are extracted in order and run with bash (`set -euo pipefail`) in a scratch
working directory laid out like the repository's root: `runs/` and `data/` are created there, and
`../shared/data/nih-chestxray14` resolves (a symlink) to the real NIH sample when it exists. The venv's `bin/` is
first on PATH, `MEDSYNGAN_CACHE` and `FLWR_HOME` point into the scratch folder and nothing is downloaded.
Blocks tagged otherwise (```text, ```toml, ```csv, ```console) are not run; an untagged block is an error, so
that no command can hide from this test.

What a real user has and a test machine does not is staged before the first block (`stage_user_files`): the
"downloaded" NIH release in `data/nih-download/` (archives `images_00N.tar.gz` of real 64-px NIH images with the
metadata rows and split lists of exactly those images) and a folder of the user's own PNG and DICOM X-rays with its
labels CSV (`data/my-xrays/`, `data/my-xrays.csv`).

The commands run as written except for the substitutions in SUBSTITUTIONS, each with its reason; they only make
runs small (few patients, tiny networks, one or two steps or rounds), replace `make demo` by the `medsyngan demo`
it runs, and move fixed ports to free ones. Every substitution must apply somewhere, so the table cannot rot
either.

Blocks that start a long-running server (`flower-superlink`, `flower-supernode`: "in its own terminal" in the
README) are started in the background in their own session, and the next block runs once the server says it is
ready, as a reader would wait for it. Every process they started is stopped before a block that runs a federation
of its own (STOP_SERVERS_BEFORE) and at the end, and the test fails if one survives. After each block,
EXPECTED_OUTPUTS checks that it produced what the README says it produces (`flwr run` exits with 0 even when the run
fails, so an exit status alone proves nothing).
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from dicom_files import write_xray_dicom

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
NIH_DIR = Path(os.environ.get("MEDSYNGAN_NIH_DIR", REPO.parent / "shared" / "data" / "nih-chestxray14"))
NIH_IN_README = "../shared/data/nih-chestxray14"
CONFIG_START, CONFIG_END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
BLOCK_TIMEOUT_S = 600

# The fixed ports of the deployment guide; each gets a free port so that concurrent runs cannot collide.
PORTS = ("9093", "9094", "9095", "9096")

# (pattern, replacement, why). Replacements may name {repo} and {port9093} … {port9096}.
TINY_TRAIN = ("--steps 2 --rounds 1 --set federated.local_steps=2 --set train.batch_size=8 --set model.ngf=8 "
              "--set model.ndf=8 --set eval.num_samples=32 --set train.checkpoint_every=1 --set train.sample_every=1")
SUBSTITUTIONS: list[tuple[str, str, str]] = [
    (r"^make demo\b.*$",
     "medsyngan demo --quick --set federated.rounds=1 --set federated.eval_every=1 --set eval.num_samples=64",
     "`make demo` is `medsyngan demo` in the venv; --quick and one round keep it to about a minute"),
    (r"^make test\b.*$", "true",
     "`make test` runs this very test suite: not re-entered"),
    (r"--patients 100\b", "--patients 12", "fewer phantom patients"),
    (r"--patients 60\b", "--patients 20", "fewer phantom patients per hospital"),
    (r"--size 256\b", "--size 64", "the staged NIH images and the phantoms are small; 256 px only costs time"),
    (r"^(medsyngan train (?!.*--resume).*)$", r"\1 " + TINY_TRAIN, "tiny networks, one or two steps or rounds"),
    (r"--resume --steps 4000\b", "--resume --steps 4", "resume to 4 steps instead of 4000"),
    (r"--count 1000\b", "--count 64", "fewer synthetic images"),
    (r"--count 100\b", "--count 8", "fewer synthetic DICOM files"),
    (r"^(medsyngan evaluate --run .*)$", r"\1 --count 64 --snapshot-count 32 --ppl-samples 100",
     "evaluate fewer generated images"),
    (r"^(medsyngan privacy --config demo .*?)(\s+#.*)?$",
     r"\1 --set data.phantom_patients=90 --set data.phantom_images_per_patient=2 --set train.batch_size=8\2",
     "the quick demo's phantom set instead of the full demo's"),
    (r"federated\.rounds=2\b", "federated.rounds=1", "one federated round"),
    (r"federated\.local_steps=5\b", "federated.local_steps=2", "two local steps"),
    (r"train\.batch_size=16\b", "train.batch_size=8", "small batches for the small hospitals"),
    (r"(overrides='[^']*)'", r"\1 eval.num_samples=32'", "fewer images for the federation's final evaluation"),
    (r"^(python scripts/deploy/federation\.py rehearse .*)$", r"\1 --set eval.num_samples=32",
     "fewer images for the rehearsal's final evaluation"),
    (r"^flwr run \. ", "flwr run {repo} ", "the Flower app is the repository, not the scratch folder"),
    (r"(?<![\w/])scripts/deploy/federation\.py", "{repo}/scripts/deploy/federation.py",
     "the launch script lives in the repository"),
] + [(rf"\b{port}\b", f"{{port{port}}}", "a free port instead of a fixed one") for port in PORTS]

# Long-running servers: started in the background, ready when their log matches.
SERVERS = {
    "flower-superlink": re.compile(r"Uvicorn running on https?://"),
    "flower-supernode": re.compile(r"SuperNode ID: \d+"),
}

# A block that starts a federation of its own: the servers of the manual steps are stopped before it, as a reader
# who has finished those steps would stop them (Ctrl-C in their terminals).
STOP_SERVERS_BEFORE = re.compile(r"federation\.py rehearse")

# What the commands must have produced, checked right after the first block that matches the regex (paths relative
# to the scratch folder, globs allowed; a number is the exact count of matching files, None means at least one).
EXPECTED_OUTPUTS: dict[str, dict[str, int | None]] = {
    r"medsyngan demo": {"runs/demo-*/report.html": None, "runs/demo-*/summary.json": None,
                        "runs/demo-*/federated/checkpoints/latest": None},
    r"tar -xzf": {"data/nih/images/*.png": None},
    r"--split test": {"data/nih-train-64/index.csv": None, "data/nih-test-64/index.csv": None,
                      "data/nih-train-256/index.csv": None},
    r"data partition": {"data/nih-hospitals.csv": None, "data/nih-hospitals.png": None},
    r"--resume": {"runs/nih-dcgan64/checkpoints/step-000004": None},
    r"federated\.partition=": {"runs/nih-federated/checkpoints/round-00001": None},
    r"medsyngan generate": {"runs/nih-dcgan64/synthetic/*.png": 64, "runs/nih-federated/synthetic-dicom/*.dcm": 8},
    r"medsyngan evaluate --run": {"runs/nih-federated/eval/metrics.json": None,
                                  "runs/nih-federated/eval/report.html": None},
    r"--labels data/my-xrays\.csv": {"data/my-xrays-128/index.csv": None},
    r"data/phantoms-64": {"data/phantoms-64/index.csv": None},
    r"pki init": {"runs/deploy/pki/manifest.json": None},
    r"flwr run": {"runs/deployed/checkpoints/round-00001": None},
    r"federation\.py rehearse": {"runs/deploy/rehearsal/run/checkpoints/round-00001": None},
    r"privacy keygen": {"runs/checkpoint.key": None},
    r"medsyngan evaluate --fake": {"runs/nih-dcgan64/eval-folder/metrics.json": None},
}


@dataclass
class Block:
    index: int
    line: int
    lang: str
    text: str


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for match in re.finditer(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", text, flags=re.M | re.S):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(len(blocks), line, match.group(1).strip(), match.group(2)))
    return blocks


def substitute(blocks: list[Block], values: dict[str, str]) -> list[str]:
    """The bash blocks with SUBSTITUTIONS applied; fails on a substitution that no longer applies anywhere."""
    used = {pattern: 0 for pattern, _, _ in SUBSTITUTIONS}
    scripts = []
    for block in blocks:
        # Continuation lines are joined first, so that a pattern anchored at a command sees the whole command.
        script = block.text.replace("\\\n", " ")
        for pattern, replacement, _ in SUBSTITUTIONS:
            script, n = re.subn(pattern, replacement.format(**values), script, flags=re.M)
            used[pattern] += n
        scripts.append(script)
    unused = [p for p, n in used.items() if n == 0]
    assert not unused, f"substitutions that no longer match anything in README.md (update the table): {unused}"
    return scripts


def test_every_block_declares_its_language():
    untagged = [b.line for b in readme_blocks(README.read_text()) if not b.lang]
    assert not untagged, (f"README.md blocks without a language at lines {untagged}: "
                          "tag them bash (run by this test) or text/toml/csv/console")


def test_configuration_reference_is_generated_from_the_schema():
    from medsyngan.config import schema_markdown

    text = README.read_text()
    assert text.count(CONFIG_START) == 1 and text.count(CONFIG_END) == 1, "README.md lost its config-reference markers"
    block = text.split(CONFIG_START, 1)[1].split(CONFIG_END, 1)[0].strip("\n")
    assert block == schema_markdown(), (
        "README.md's configuration reference differs from the schema: regenerate it with "
        "`python scripts/update-readme-config.py` (it writes `python -m medsyngan.cli config reference` into README.md)"
    )


# --- staging what a real user has --------------------------------------------------------------------------


def _nih_sample_release(download: Path) -> int:
    """A miniature NIH release from the real 64-px sample: two archives of `images/…` PNGs, and the metadata
    rows and split lists of exactly those images. The sample holds only official train_val images, so the
    patients whose id is a multiple of 5 are listed as test here (still patient-disjoint), so that the README's
    test split has images."""
    names = sorted(p.name for p in (NIH_DIR / "images-64").glob("*.png"))
    wanted = set(names)
    with open(NIH_DIR / "Data_Entry_2017_v2020.csv", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = [row for row in reader if row[0] in wanted]
    with open(download / "Data_Entry_2017_v2020.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header] + rows)
    test = [n for n in names if int(n.split("_")[0]) % 5 == 0]
    (download / "train_val_list.txt").write_text("".join(n + "\n" for n in names if n not in set(test)))
    (download / "test_list.txt").write_text("".join(n + "\n" for n in test))
    half = len(names) // 2
    for k, chunk in enumerate((names[:half], names[half:]), start=1):
        with tarfile.open(download / f"images_{k:03d}.tar.gz", "w:gz") as tar:
            for name in chunk:
                tar.add(NIH_DIR / "images-64" / name, arcname=f"images/{name}")
    return len(names)


def _phantom_release(download: Path, scratch: Path) -> int:
    """Without the NIH sample: phantoms, which are written in the NIH layout, packed the same way. 120 patients:
    with 60, the README's label-skew partition (α = 0.5, seed 0) left a hospital 2 patients, too few for its batch."""
    source = scratch / "phantom-release"
    subprocess.run([sys.executable, "-m", "medsyngan.cli", "data", "phantoms", "--out", str(source), "--patients",
                    "120", "--images-per-patient", "3", "--size", "64"], check=True, capture_output=True)
    for name in ("Data_Entry_2017_v2020.csv", "train_val_list.txt", "test_list.txt"):
        (download / name).write_bytes((source / name).read_bytes())
    with tarfile.open(download / "images_001.tar.gz", "w:gz") as tar:
        tar.add(source / "images", arcname="images")
    return len(list((source / "images").glob("*.png")))


def _my_xrays(data: Path, nih_images: Path) -> None:
    """A user's own folder: PNGs and DICOMs (one in a subfolder, as in the README's CSV example) with labels."""
    from PIL import Image

    folder = data / "my-xrays"
    (folder / "sub").mkdir(parents=True)
    sources = sorted(nih_images.rglob("*.png"))[:8]
    rows = [("image", "patient", "labels", "view", "split")]
    for k, src in enumerate(sources):
        grey = np.asarray(Image.open(src).convert("L"))
        patient, split = f"p{k // 2:03d}", "test" if k >= 6 else "train_val"
        name = "sub/a.dcm" if k == 0 else (f"x{k}.dcm" if k % 3 == 0 else f"x{k}.png")
        if name.endswith(".dcm"):
            write_xray_dicom(folder / name, grey.astype(np.uint16) * 16, patient)
        else:
            Image.fromarray(grey).save(folder / name)
        rows.append((name, patient, "Effusion|Nodule" if k == 0 else "No Finding", "PA", split))
    with open(data / "my-xrays.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def stage_user_files(scratch: Path, work: Path) -> bool:
    """Returns whether the real NIH sample is available (else the release is staged from phantoms)."""
    shared = scratch / "shared" / "data"
    shared.mkdir(parents=True)
    download = work / "data" / "nih-download"
    download.mkdir(parents=True)
    have_nih = (NIH_DIR / "Data_Entry_2017_v2020.csv").is_file() and (NIH_DIR / "images-64").is_dir()
    if have_nih:
        (shared / "nih-chestxray14").symlink_to(NIH_DIR, target_is_directory=True)
        _nih_sample_release(download)
    else:
        _phantom_release(download, scratch)
    unpacked = scratch / "unpacked"
    for archive in sorted(download.glob("images_*.tar.gz")):
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
    _my_xrays(work / "data", unpacked)
    return have_nih


# --- running the blocks ------------------------------------------------------------------------------------


def _environment(scratch: Path) -> dict[str, str]:
    venv_bin = REPO / ".venv" / "bin"
    bin_dir = venv_bin if (venv_bin / "medsyngan").exists() else Path(sys.executable).parent
    env = dict(os.environ)
    env.update({
        "PATH": os.pathsep.join([str(bin_dir), env.get("PATH", "")]),
        "MEDSYNGAN_CACHE": str(scratch / "cache"),
        "MEDSYNGAN_OFFLINE": "1",
        "FLWR_HOME": str(scratch / "flwr-home"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "COLUMNS": "160",
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("VIRTUAL_ENV", None)
    return env


def _run_foreground(script: str, cwd: Path, env: dict[str, str], log: Path) -> tuple[int, str]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-c", "set -euo pipefail\n" + script], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = -1
    return rc, log.read_text(errors="replace")


def _check_outputs(work: Path, expected: dict[str, int | None], block: Block, logs: Path) -> None:
    for pattern, count in expected.items():
        found = len(list(work.glob(pattern)))
        if (found == count) if count is not None else found > 0:
            continue
        latest = sorted(logs.glob("*.log"), key=lambda p: p.stat().st_mtime)[-3:]
        tails = "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:])
                          for p in latest)
        raise AssertionError(f"README.md block at line {block.line} exited 0 but produced {found} of {pattern} "
                             f"(expected {count or 'some'}):\n{tails}")


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    from medsyngan.federated import processes

    blocks = readme_blocks(README.read_text())
    bash = [b for b in blocks if b.lang == "bash"]
    assert bash, "README.md has no ```bash blocks"
    values = {"repo": str(REPO), **{f"port{p}": str(processes.free_port()) for p in PORTS}}
    scripts = substitute(bash, values)
    checks = {t: next((b for b, s in zip(bash, scripts) if re.search(t, s)), None) for t in EXPECTED_OUTPUTS}
    unmatched = [t for t, b in checks.items() if b is None]
    assert not unmatched, f"EXPECTED_OUTPUTS triggers that match no README block (update the table): {unmatched}"

    work = tmp_path / "work"
    work.mkdir()
    have_nih = stage_user_files(tmp_path, work)
    env = _environment(tmp_path)
    servers: list[processes.ManagedProcess] = []
    timings: list[str] = []
    try:
        for block, script in zip(bash, scripts):
            if NIH_IN_README in script and not have_nih:
                warnings.warn(f"README.md line {block.line}: skipped, the NIH sample is missing at {NIH_DIR} "
                              "(set MEDSYNGAN_NIH_DIR)")
                continue
            if STOP_SERVERS_BEFORE.search(script) and servers:
                left = processes.stop_all(servers)
                assert left == [], f"processes left running after stopping the servers: {left}"
                servers.clear()
            started = time.monotonic()
            server = next((name for name in SERVERS if re.search(rf"(^|\s){name}\s", script)), None)
            if server:
                proc = processes.start_process(f"readme-line-{block.line}", ["bash", "-c", "set -euo pipefail\n" + script],
                                            tmp_path / "logs" / f"line-{block.line}.log", env, cwd=work)
                proc.last = server == "flower-superlink"  # stopped after the SuperNodes, as Flower expects
                servers.append(proc)
                ready = proc.wait_for(SERVERS[server], timeout=180)
                assert ready, f"README.md line {block.line} ({server}) exited before it was ready:\n{proc.log_tail(30)}"
            else:
                log = tmp_path / "logs" / f"line-{block.line}.log"
                log.parent.mkdir(exist_ok=True)
                rc, output = _run_foreground(script, work, env, log)
                assert rc == 0, (f"README.md block at line {block.line} failed (exit {rc}):\n{script}\n"
                                 f"--- output ---\n{output[-6000:]}")
            timings.append(f"line {block.line}: {time.monotonic() - started:.1f} s")
            for trigger, first in checks.items():
                if first is block:
                    _check_outputs(work, EXPECTED_OUTPUTS[trigger], block, tmp_path / "logs")
    finally:
        leftovers = processes.stop_all(servers)
        print("\n".join(timings))
    assert leftovers == [], f"processes left running: {leftovers}"
