"""Old import path of the run log: the writer (:mod:`gradscope.outputs.runlog`) and the reader
(:mod:`gradscope.run.logfile`, :func:`gradscope.load_run`), kept so that user code keeps working."""

from gradscope.health.readout import Run, load_run
from gradscope.outputs.runlog import RunLog
from gradscope.run.logfile import SEGMENT_BYTES, RunLogError, check_log_dir

__all__ = ["SEGMENT_BYTES", "Run", "RunLog", "RunLogError", "check_log_dir", "load_run"]
