"""histoflow: a reproducible whole-slide-image workflow, from download to an audited slide-level model.

The package holds the logic; the Snakemake rules in ``workflow/`` only wire it together.
One module per stage (``download``, ``slide_qc``, ``tissue``, ``tiling``, ...), settings as
dataclasses, pure array functions in the middle and file I/O at the edges.
"""

__version__ = "0.1.0"
