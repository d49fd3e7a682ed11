"""The paper's analysis in one command: Table 2, the ablation (Table 4), the number of experts (Figure 3) and
the grouping features (Figure 4), with tables and plots, at CPU and at paper scale.

    python -m thinkrec.experiments all                       # cpu-small: about 3.5 hours on 2 CPU cores
    python -m thinkrec.experiments ablation --scale paper    # the paper's setting, for a GPU

How: every pipeline run is `train.py` in a subprocess (memory stays bounded; a killed run resumes), in its
own kept directory under RUNS/<scale>/; the data, one CF model per kind and the reasoning traces are made
once and linked in, and finished stages 1 and 2 are shared between settings with the same inputs (runs.py).
Each study writes RESULTS/<study>.md, .json and PNG plots (report.py). What runs where: plan.py.
"""

from .plan import SCALES, SETTINGS, STUDIES, Setting
from .runs import Config, ExperimentError, Log
from .studies import run

__all__ = ["SCALES", "SETTINGS", "STUDIES", "Config", "ExperimentError", "Log", "Setting", "run"]
