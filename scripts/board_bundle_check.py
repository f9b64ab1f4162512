"""Export a small model for aarch64, run the bundle on the emulated board with tvmconv's runtime alone,
and compare with the same model run on this host.

    scripts/arm_board.sh setup     # once (the board need not be running: this runs its Python directly)
    .venv/bin/python scripts/board_bundle_check.py [--workdir DIR]

On the board only TVM's aarch64 wheels and numpy are installed; the check copies tvmconv's
package marker and runtime module (no compiler modules) next to the bundle and runs there.
Exit status 0 when the board's outputs match the host's (rtol 1e-4).
"""
import argparse
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
BOARD_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, "/mnt/host")
from tvmconv import runtime
predict = runtime.load("/mnt/host/bundle")
x = np.load("/mnt/host/x.npy")
np.save("/mnt/host/y_board.npy", predict(x))
print("board modules:", sorted(m for m in sys.modules if m.startswith("tvmconv")), "tvm imported:", "tvm" in sys.modules)
"""


def build_model(tvmconv):
    model = tvmconv.Sequential(name="board_check")
    init = tvmconv.initializers.HeNormal(seed=0)
    tvmconv.layer_conv_2d(model, 16, 3, padding="same", activation="relu", input_shape=(12, 12, 3),
                          kernel_initializer=init)
    tvmconv.layer_conv_2d(model, 16, 3, strides=2, padding="same", groups=16, activation="relu",
                          kernel_initializer=init)
    tvmconv.layer_conv_2d(model, 8, 1, activation="sigmoid", kernel_initializer=init)
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where to stage the bundle (default: a temporary folder)")
    args = parser.parse_args(argv)
    import tvmconv

    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="tvmconv-board-"))
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(tvmconv)
    x = np.random.default_rng(0).standard_normal((3, 12, 12, 3)).astype(np.float32)
    expected = model(x)
    manifest = tvmconv.export(model, (1, 12, 12, 3), str(work / "bundle"), target="aarch64")
    np.save(work / "x.npy", x)
    package = work / "tvmconv"
    package.mkdir(exist_ok=True)
    for name in ("__init__.py", "runtime.py"):  # the runtime alone: no compute, schedules, build, tuning
        shutil.copy(REPO / "tvmconv" / name, package / name)
    (work / "run.py").write_text(BOARD_SCRIPT)
    print(f"bundle for {manifest['target_key']} in {work / 'bundle'}; running it on the board", flush=True)
    result = subprocess.run([str(REPO / "scripts" / "arm_board.sh"), "python", str(work), "run.py"], check=False)
    if result.returncode != 0:
        print(f"the board's run failed (exit status {result.returncode})", file=sys.stderr)
        return 1
    board = np.load(work / "y_board.npy")
    error = float(np.abs(board - expected).max())
    ok = board.shape == expected.shape and np.allclose(board, expected, rtol=1e-4, atol=1e-5)
    print(f"board output {board.shape} vs host {expected.shape}: max |difference| {error:.2e} -> "
          f"{'OK' if ok else 'MISMATCH'}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
