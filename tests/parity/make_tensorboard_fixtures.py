#!/usr/bin/env python3
"""TensorBoard's own event-file writer on fixed scalars, for Loft's `tensorboard` test; and a
reader of Loft's logs through TensorBoard (run by hand only).

    .venv-parity/bin/pip install tensorboard==2.20.0
    .venv-parity/bin/python tests/parity/make_tensorboard_fixtures.py            # the fixture
    .venv-parity/bin/python tests/parity/make_tensorboard_fixtures.py --check DIR   # read Loft's logs

The fixture: the events sd-scripts' logging produces (torch.utils.tensorboard's `scalar()`
summaries, which accelerate's TensorBoard tracker writes) framed by TensorBoard's RecordWriter,
with fixed wall times, in tests/fixtures/tensorboard/scalars.tfevents, and the list of them in
scalars.json. Loft writes the same events and compares the bytes.

`--check DIR` loads every run under DIR with TensorBoard's EventAccumulator (what the
TensorBoard app uses) and prints each run's scalar tags with their step ranges.
"""

import json
import sys
from pathlib import Path

repo = Path(__file__).resolve().parents[2]

if len(sys.argv) == 3 and sys.argv[1] == "--check":
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted({p.parent for p in Path(sys.argv[2]).rglob("events.out.tfevents.*")})
    if not runs:
        sys.exit(f"no event files under {sys.argv[2]}")
    for run in runs:
        acc = EventAccumulator(str(run))
        acc.Reload()
        print(run)
        for tag in acc.Tags()["scalars"]:
            events = acc.Scalars(tag)
            print(f"  {tag}: {len(events)} values, steps {events[0].step}..{events[-1].step}, last {events[-1].value:.6g}")
    sys.exit(0)

from tensorboard.compat.proto import event_pb2  # noqa: E402
from tensorboard.summary.writer.record_writer import RecordWriter  # noqa: E402
from torch.utils.tensorboard.summary import scalar  # noqa: E402

start = 1796342400.25
scalars = [
    [1, "loss/current", 0.123456789, start + 1.5],
    [1, "loss/average", 0.123456789, start + 1.5],
    [1, "lr/unet", 1e-4, start + 1.5],
    [1, "lr/textencoder_plus", 5e-5, start + 1.5],
    [2, "loss/current", 0.0, start + 2.75],
    [300, "time/it_per_sec", 2.5, start + 3.0],
    [1, "loss/epoch_average", 0.2, start + 3.0],
    [70000, "loss/validation/step_divergence", -0.03125, start + 4.0],
]
out_dir = repo / "tests/fixtures/tensorboard"
out_dir.mkdir(parents=True, exist_ok=True)
with open(out_dir / "scalars.tfevents", "wb") as f:
    writer = RecordWriter(f)
    writer.write(event_pb2.Event(wall_time=start, file_version="brain.Event:2").SerializeToString())
    for step, tag, value, wall_time in scalars:
        writer.write(event_pb2.Event(wall_time=wall_time, step=step, summary=scalar(tag, value)).SerializeToString())
    writer.flush()
(out_dir / "scalars.json").write_text(json.dumps({"start": start, "scalars": scalars}, indent=1) + "\n")
print("wrote", out_dir / "scalars.tfevents")
