"""sourceflow: flow matching with better sources and noise–data couplings.

The library the pipeline's stages share. It never imports Snakemake; the dependency direction is
Snakefile → stages → sourceflow.
"""

__version__ = "0.1.0"
