"""Output files under hostile conditions: concurrent runs never share or replace a name, and `convert -o` onto a
device, a pipe or a symlink writes through it instead of replacing it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import av

from kineflow.runtime import cli, files

ROOT = Path(__file__).resolve().parent.parent

# One writer process: imports done, it says "ready", waits for the start file, then saves `count` videos with the shared
# prefix, each tagged with its writer and number, and prints each reported name.
WRITER = """
import sys, time
from pathlib import Path
import torch
from kineflow.runtime import media
out, start, count, tag = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
print("ready", flush=True)
while not start.exists():
    time.sleep(0.001)
for k in range(count):
    frames = torch.full((2, 16, 16, 3), 0.5)
    path, entry = media.save_video(frames, out, "race", "mp4", 8.0, metadata={"writer": f"{tag}-{k}"})
    print(entry["filename"], f"{tag}-{k}", flush=True)
"""


def test_concurrent_writers_with_one_prefix_never_share_or_replace_a_file(tmp_path):
    """Writers released at the same instant race for the same counter: each claims its own name."""
    out, start = tmp_path / "output", tmp_path / "start"
    writers, count = 4, 4
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(start), str(count), f"w{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(writers)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    start.touch()
    reported = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        for line in stdout.splitlines():
            filename, tag = line.split()
            assert filename not in reported, f"{filename} reported by {reported.get(filename)} and {tag}"
            reported[filename] = tag
    assert len(reported) == writers * count
    assert sorted(os.listdir(out)) == sorted(reported), "a file is missing, or a temporary file or claim was left"
    for filename, tag in reported.items():  # each file holds what its reporter wrote: none was replaced
        with av.open(str(out / filename)) as container:
            assert container.metadata.get("writer") == tag, filename


def test_a_claimed_name_that_is_never_written_is_released(tmp_path):
    path, _, name = files.next_output_path(tmp_path, "KineFlow", "mp4")
    assert path.is_file() and path.stat().st_size == 0  # claimed: no other run can take it
    assert files.next_output_path(tmp_path, "KineFlow", "mp4")[2] == "KineFlow_00002_.mp4"
    files.release_claim(path)
    assert not path.exists() and (tmp_path / "KineFlow_00002_.mp4").exists()
    files.remove_unfinished()
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- convert -o
def _ui_workflow() -> Path:
    return ROOT / "workflows" / "text_to_video.json"


def _convert(output: str) -> subprocess.CompletedProcess:
    main = "import sys; from kineflow.runtime.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", main, "convert", str(_ui_workflow()), "--to", "api", "-o", output],
                          capture_output=True, text=True, timeout=120)


def test_convert_to_dev_stdout_writes_to_standard_output():
    done = _convert("/dev/stdout")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["1"]["class_type"] and "wrote /dev/stdout" in done.stderr


def test_convert_to_a_character_device_writes_into_it(tmp_path, capsys):
    assert cli.main(["convert", str(_ui_workflow()), "--to", "api", "-o", os.devnull]) == 0
    assert "wrote /dev/null" in capsys.readouterr().err
    assert not Path(os.devnull).is_file() and Path(os.devnull).is_char_device()
    assert not [name for name in os.listdir("/dev") if name.startswith(".null.")]


def test_convert_through_a_symlink_keeps_the_link(tmp_path, capsys):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert cli.main(["convert", str(_ui_workflow()), "--to", "api", "-o", str(link)]) == 0
    assert link.is_symlink() and json.loads(target.read_text())["1"]["class_type"]
    assert sorted(os.listdir(tmp_path)) == ["link.json", "real.json"]


def test_convert_to_a_fifo_writes_into_it(tmp_path):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    main = "import sys; from kineflow.runtime.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", main, "convert", str(_ui_workflow()), "--to", "api", "-o", str(fifo)],
                            stderr=subprocess.PIPE, text=True)
    with open(fifo, encoding="utf-8") as reader:  # the writer blocks until this reader opens, as with `> fifo`
        received = reader.read()
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert json.loads(received)["1"]["class_type"] and fifo.is_fifo()


def test_convert_to_a_regular_file_replaces_it_atomically(tmp_path, capsys):
    target = tmp_path / "api.json"
    target.write_text("old")
    inode = target.stat().st_ino
    assert cli.main(["convert", str(_ui_workflow()), "--to", "api", "-o", str(target)]) == 0
    assert json.loads(target.read_text())["1"]["class_type"] and target.stat().st_ino != inode
    assert os.listdir(tmp_path) == ["api.json"]
