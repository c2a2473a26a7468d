"""Old import path of :mod:`gradscope.outputs.visual` (kept so that user code keeps working).

The visual report needs matplotlib only when a report is drawn, so this import is free.
"""

from gradscope.outputs.html_page import html_report, write_html
from gradscope.outputs.visual import PANELS, RunData, figure, write_png

__all__ = ["PANELS", "RunData", "figure", "html_report", "write_html", "write_png"]
