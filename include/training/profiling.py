"""Profile a window of training steps (the ``profile_steps`` param).

Every rank records the window with ``torch.profiler`` and writes a Chrome
trace (``trace-rank<N>.json``, open it in Perfetto or chrome://tracing). On
CUDA the window is also bracketed with cudaProfilerStart/Stop, so a launch
under ``nsys profile --capture-range=cudaProfilerApi`` (the sbatch template
does this when nsys is on the node) captures exactly the same steps, as the
reference repo's Nsight recipe does.
"""

from __future__ import annotations

from pathlib import Path

import torch


class StepProfiler:
    """Profiles steps ``first`` to ``first + count - 1`` (1-based step numbers, as logged)."""

    def __init__(self, out_dir: str, first: int, count: int, rank: int, device: torch.device) -> None:
        self.out_dir, self.first, self.last, self.rank = Path(out_dir), first, first + count - 1, rank
        self.cuda = device.type == "cuda"
        self.profiler: torch.profiler.profile | None = None
        self.enabled = count > 0

    def before_step(self, step: int) -> None:
        if not self.enabled or step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.profiler.start()
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        self.profiler.__enter__()

    def after_step(self, step: int) -> Path | None:
        """Stop after the window's last step; the trace's path (on every rank), else None."""
        if self.profiler is None or step != self.last:
            return None
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        self.profiler.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"trace-rank{self.rank}.json"
        self.profiler.export_chrome_trace(str(path))
        self.profiler = None
        return path
