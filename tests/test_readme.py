"""Every command in README.md and in the guides under docs/ is run here, so the documentation cannot rot.

The ```bash blocks of each document are extracted in order and run with bash (`set -euo pipefail`) in a scratch
working directory laid out like the repository's root: `runs/` and `data/` are created there, and
`../shared/data/nih-chestxray14` resolves (a symlink) to the real NIH sample when it exists. The venv's `bin/` is
first on PATH, `MEDSYNGAN_CACHE` and `FLWR_HOME` point into the scratch folder and nothing is downloaded.
Blocks tagged ```text, ```toml or ```csv are not commands; ```console blocks hold commands that take hours (the
NIH study, the benchmarks: tests/test_study.py runs the study's quick form) and are shown, not run. An untagged
block is an error, so that no command can hide from this test.

There is one test per document (DOCUMENTS, in reading order). All documents share one scratch folder, as one
reader working through them would: a guide that builds on another's outputs names it in REQUIRES, and running
that guide alone runs the guides it requires first.

What a real user has and a test machine does not (the downloaded NIH release, a folder of their own X-rays) is
staged once, before the first block, by `doc_user_files.stage_user_files`.

The commands run as written except for the substitutions in SUBSTITUTIONS, each with its reason; they only make
runs small (few patients, tiny networks, one or two steps or rounds), replace `make demo` by the `medsyngan demo`
it runs, and move fixed ports to free ones. Every substitution must apply somewhere, so the table cannot rot
either.

Blocks that start a long-running server (`flower-superlink`, `medsyngan hospital start`: "in its own terminal" in
the deployment guide) are started in the background in their own session, and the next block runs once the server
says it is ready, as a reader would wait for it. Every process they started is stopped before a block that runs a
federation of its own (STOP_SERVERS_BEFORE) and at the end of the document, and the test fails if one survives.
After each block, EXPECTED_OUTPUTS checks that it produced what the document says it produces (`flwr run` exits
with 0 even when the run fails, so an exit status alone proves nothing).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from doc_user_files import NIH_DIR, stage_user_files

REPO = Path(__file__).resolve().parents[1]
NIH_IN_DOCS = "../shared/data/nih-chestxray14"
CONFIG_REFERENCE = REPO / "docs" / "configuration.md"
CONFIG_START, CONFIG_END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
BLOCK_TIMEOUT_S = 600

# The documents whose bash blocks run, in reading order; REQUIRES names the documents whose outputs a guide uses.
DOCUMENTS = ("README.md", "docs/data.md", "docs/training.md", "docs/metrics.md", "docs/privacy.md",
             "docs/configuration.md", "docs/deployment.md")
REQUIRES = {"docs/training.md": ("docs/data.md",), "docs/metrics.md": ("docs/training.md",)}
LANGUAGES = {"bash", "console", "text", "toml", "csv"}

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
    (r"--patients 200\b", "--patients 40", "fewer phantom patients; 40 leave about 8 test patients to evaluate on"),
    (r"--patients 100\b", "--patients 12", "fewer phantom patients"),
    (r"--patients 60\b", "--patients 20", "fewer phantom patients per hospital"),
    (r"--size 256\b", "--size 64", "the staged NIH images and the phantoms are small; 256 px only costs time"),
    (r"^(medsyngan train (?!.*--resume).*)$", r"\1 " + TINY_TRAIN, "tiny networks, one or two steps or rounds"),
    (r"--resume --steps 4000\b", "--resume --steps 4", "resume to 4 steps instead of 4000"),
    (r"--count 1000\b", "--count 64", "fewer synthetic images"),
    (r"--count 100\b", "--count 8", "fewer synthetic DICOM files"),
    (r"^(medsyngan evaluate --run .*)$", r"\1 --count 64 --snapshot-count 32 --ppl-samples 100",
     "evaluate fewer generated images"),
    (r"^(medsyngan privacy --config demo\b.*?)(\s+#.*)?$",
     r"\1 --set data.phantom_patients=90 --set data.phantom_images_per_patient=2 --set train.batch_size=8\2",
     "the quick demo's phantom set instead of the full demo's"),
    (r"federated\.rounds=2\b", "federated.rounds=1", "one federated round"),
    (r"federated\.local_steps=5\b", "federated.local_steps=2", "two local steps"),
    (r"train\.batch_size=16\b", "train.batch_size=8", "small batches for the small hospitals"),
    (r"(overrides='[^']*)'", r"\1 eval.num_samples=32'", "fewer images for the federation's final evaluation"),
    (r"^(python scripts/deploy/federation\.py rehearse .*)$", r"\1 --set eval.num_samples=32",
     "fewer images for the rehearsal's final evaluation"),
    (r"^flwr run \. ", "flwr run {repo} ", "the Flower app is the repository, not the scratch folder"),
    (r"--app \. ", "--app {repo} ", "the Flower app signed is the repository, not the scratch folder"),
    (r"(?<![\w/])scripts/deploy/federation\.py", "{repo}/scripts/deploy/federation.py",
     "the launch script lives in the repository"),
] + [(rf"\b{port}\b", f"{{port{port}}}", "a free port instead of a fixed one") for port in PORTS]

# Long-running servers: started in the background, ready when their log matches.
SERVERS = {
    "flower-superlink": re.compile(r"Uvicorn running on https?://"),
    "medsyngan hospital start": re.compile(r"SuperNode ID: \d+"),
}

# A block that starts a federation of its own: the servers of the manual steps are stopped before it, as a reader
# who has finished those steps would stop them (Ctrl-C in their terminals).
STOP_SERVERS_BEFORE = re.compile(r"federation\.py rehearse")

# What the commands must have produced, checked right after the first block, in DOCUMENTS order, that matches the
# regex (paths relative to the scratch folder, globs allowed; a number is the exact count of matching files, None
# means at least one).
EXPECTED_OUTPUTS: dict[str, dict[str, int | None]] = {
    r"medsyngan demo": {"runs/demo-*/report.html": None, "runs/demo-*/summary.json": None,
                        "runs/demo-*/federated/checkpoints/latest": None},
    r"--out data/tour-test-64": {"data/tour-train-64/index.csv": None, "data/tour-test-64/index.csv": None},
    r"--out runs/tour": {"runs/tour/checkpoints/latest": None},
    r"medsyngan evaluate --run runs/tour": {"runs/tour/synthetic/*.png": 64, "runs/tour/eval/metrics.json": None,
                                            "runs/tour/eval/report.html": None},
    r"tar -xzf": {"data/nih/images/*.png": None},
    r"--split test --views": {"data/nih-train-64/index.csv": None, "data/nih-test-64/index.csv": None,
                              "data/nih-train-256/index.csv": None},
    r"data partition": {"data/nih-hospitals.csv": None, "data/nih-hospitals.png": None},
    r"--labels data/my-xrays\.csv": {"data/my-xrays-128/index.csv": None},
    r"data/phantoms-64": {"data/phantoms-64/index.csv": None},
    r"--resume": {"runs/nih-dcgan64/checkpoints/step-000004": None},
    r"federated\.partition=": {"runs/nih-federated/checkpoints/round-00001": None},
    r"medsyngan generate --run runs/nih-dcgan64": {"runs/nih-dcgan64/synthetic/*.png": 64,
                                                   "runs/nih-federated/synthetic-dicom/*.dcm": 8},
    r"medsyngan evaluate --fake": {"runs/nih-dcgan64/eval-folder/metrics.json": None},
    r"privacy keygen": {"runs/checkpoint.key": None, "runs/sealed/synthetic/*.png": 16},
    r"pki init": {"runs/deploy/pki/manifest.json": None},
    r"flwr run": {"runs/deployed/checkpoints/round-00001": None},
    r"federation\.py rehearse": {"runs/deploy/rehearsal/run/checkpoints/round-00001": None},
}


@dataclass
class Block:
    doc: str
    index: int
    line: int
    lang: str
    text: str


def markdown_files() -> list[Path]:
    return [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]


def document_blocks(doc: str) -> list[Block]:
    text = (REPO / doc).read_text()
    blocks = []
    for match in re.finditer(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", text, flags=re.M | re.S):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(doc, len(blocks), line, match.group(1).strip(), match.group(2)))
    return blocks


def bash_blocks(doc: str) -> list[Block]:
    return [b for b in document_blocks(doc) if b.lang == "bash"]


def substitute(blocks: list[Block], values: dict[str, str]) -> tuple[list[str], dict[str, int]]:
    """The bash blocks with SUBSTITUTIONS applied, and how often each pattern applied."""
    used = {pattern: 0 for pattern, _, _ in SUBSTITUTIONS}
    scripts = []
    for block in blocks:
        # Continuation lines are joined first, so that a pattern anchored at a command sees the whole command.
        script = block.text.replace("\\\n", " ")
        for pattern, replacement, _ in SUBSTITUTIONS:
            script, n = re.subn(pattern, replacement.format(**values), script, flags=re.M)
            used[pattern] += n
        scripts.append(script)
    return scripts, used


def _placeholder_values() -> dict[str, str]:
    return {"repo": str(REPO), **{f"port{p}": p for p in PORTS}}


def _all_bash_scripts() -> list[tuple[Block, str]]:
    blocks = [b for doc in DOCUMENTS for b in bash_blocks(doc)]
    scripts, _ = substitute(blocks, _placeholder_values())
    return list(zip(blocks, scripts))


def _first_blocks() -> dict[str, tuple[str, int]]:
    """For each EXPECTED_OUTPUTS trigger, the (document, block index) of the first bash block that matches it."""
    pairs = _all_bash_scripts()
    first = {}
    for trigger in EXPECTED_OUTPUTS:
        hit = next((b for b, s in pairs if re.search(trigger, s)), None)
        if hit is not None:
            first[trigger] = (hit.doc, hit.index)
    return first


# --- fast checks of the documents -----------------------------------------------------------------------------


def test_every_block_declares_a_known_language():
    bad = [f"{b.doc}:{b.line} ({b.lang or 'untagged'})" for path in markdown_files()
           for b in document_blocks(str(path.relative_to(REPO))) if b.lang not in LANGUAGES]
    assert not bad, (f"code blocks without a known language: {bad}; tag them bash (run by this test), console "
                     f"(hours-long commands, shown only) or text/toml/csv")


def test_every_document_with_commands_is_run():
    listed = set(DOCUMENTS)
    unlisted = [str(p.relative_to(REPO)) for p in markdown_files()
                if str(p.relative_to(REPO)) not in listed and bash_blocks(str(p.relative_to(REPO)))]
    assert not unlisted, f"documents with bash blocks that no test runs (add them to DOCUMENTS): {unlisted}"


def test_every_substitution_and_expected_output_applies():
    blocks = [b for doc in DOCUMENTS for b in bash_blocks(doc)]
    _, used = substitute(blocks, _placeholder_values())
    unused = [p for p, n in used.items() if n == 0]
    assert not unused, f"substitutions that no longer match any document (update the table): {unused}"
    unmatched = sorted(set(EXPECTED_OUTPUTS) - set(_first_blocks()))
    assert not unmatched, f"EXPECTED_OUTPUTS triggers that match no block (update the table): {unmatched}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{path.relative_to(REPO)}: links to files or headings that do not exist: {broken}"


def test_configuration_reference_is_generated_from_the_schema():
    from medsyngan.config import schema_markdown

    text = CONFIG_REFERENCE.read_text()
    assert text.count(CONFIG_START) == 1 and text.count(CONFIG_END) == 1, \
        "docs/configuration.md lost its config-reference markers"
    block = text.split(CONFIG_START, 1)[1].split(CONFIG_END, 1)[0].strip("\n")
    assert block == schema_markdown(), (
        "docs/configuration.md's reference differs from the schema: regenerate it with "
        "`python scripts/update-readme-config.py` (it writes `python -m medsyngan.cli config reference` there)"
    )


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
        raise AssertionError(f"{block.doc} block at line {block.line} exited 0 but produced {found} of {pattern} "
                             f"(expected {count or 'some'}):\n{tails}")


@dataclass
class Workspace:
    """The scratch folder that every document's commands run in, and which documents have run there."""

    root: Path
    have_nih: bool
    env: dict[str, str]
    values: dict[str, str]
    first: dict[str, tuple[str, int]]
    outcome: dict[str, bool] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        return self.root / "work"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, nih_sample) -> Workspace:
    """``nih_sample`` fails the documents' tests under CI when the NIH sample is missing."""
    from medsyngan.federated import processes

    root = tmp_path_factory.mktemp("docs")
    (root / "work").mkdir()
    have_nih = stage_user_files(root, root / "work")
    values = {"repo": str(REPO), **{f"port{p}": str(processes.free_port()) for p in PORTS}}
    return Workspace(root, have_nih, _environment(root), values, _first_blocks())


def run_document(ws: Workspace, doc: str) -> None:
    """Run the guides `doc` requires (once), then every bash block of `doc` in order."""
    from medsyngan.federated import processes

    for required in REQUIRES.get(doc, ()):
        if required not in ws.outcome:
            run_document(ws, required)
        assert ws.outcome[required], f"{doc} needs the outputs of {required}, whose commands failed"
    ws.outcome[doc] = False
    blocks = bash_blocks(doc)
    assert blocks, f"{doc} has no bash blocks"
    scripts, _ = substitute(blocks, ws.values)
    logs = ws.root / "logs"
    logs.mkdir(exist_ok=True)
    servers: list[processes.ManagedProcess] = []
    timings: list[str] = []
    try:
        for block, script in zip(blocks, scripts):
            if NIH_IN_DOCS in script and not ws.have_nih:
                warnings.warn(f"{doc} line {block.line}: skipped, the NIH sample is missing at {NIH_DIR} "
                              "(set MEDSYNGAN_NIH_DIR)")
                continue
            if STOP_SERVERS_BEFORE.search(script) and servers:
                left = processes.stop_all(servers)
                assert left == [], f"processes left running after stopping the servers: {left}"
                servers.clear()
            started = time.monotonic()
            log = logs / f"{Path(doc).stem}-line-{block.line}.log"
            server = next((name for name in SERVERS if re.search(rf"(^|\s){name}\s", script)), None)
            if server:
                proc = processes.start_process(f"{Path(doc).stem}-line-{block.line}",
                                            ["bash", "-c", "set -euo pipefail\n" + script], log, ws.env, cwd=ws.work)
                proc.last = server == "flower-superlink"  # stopped after the SuperNodes, as Flower expects
                servers.append(proc)
                ready = proc.wait_for(SERVERS[server], timeout=180)
                assert ready, f"{doc} line {block.line} ({server}) exited before it was ready:\n{proc.log_tail(30)}"
            else:
                rc, output = _run_foreground(script, ws.work, ws.env, log)
                assert rc == 0, (f"{doc} block at line {block.line} failed (exit {rc}):\n{script}\n"
                                 f"--- output ---\n{output[-6000:]}")
            timings.append(f"{doc} line {block.line}: {time.monotonic() - started:.1f} s")
            for trigger, where in ws.first.items():
                if where == (doc, block.index):
                    _check_outputs(ws.work, EXPECTED_OUTPUTS[trigger], block, logs)
    finally:
        leftovers = processes.stop_all(servers)
        print("\n".join(timings))
    assert leftovers == [], f"processes left running: {leftovers}"
    ws.outcome[doc] = True


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCUMENTS)
def test_every_command_of_the_document_runs(doc, workspace):
    if doc not in workspace.outcome:
        run_document(workspace, doc)
    assert workspace.outcome[doc], f"{doc}'s commands failed earlier in this test run"
