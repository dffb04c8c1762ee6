# sourceflow: flow matching with better sources and couplings, as one DAG of cached artifacts.
#   snakemake --cores all                      # the embedded default (config/config.yaml)
#   snakemake --cores all --configfile my.yaml # another config (replaces the default one, no merging)
#   snakemake --cores all --configfile config/config.yaml mine.yaml   # a small file layered over the default
#   snakemake --profile profiles/slurm         # the same workflow on a SLURM cluster
import sys

from snakemake.utils import min_version, validate

min_version("9.0")


# The embedded default, unless --configfile names another: Snakemake would otherwise merge the two and
# an experiment would silently inherit settings from the default (--config key=value still applies).
if not workflow.config_settings.configfiles:

    configfile: "config/config.yaml"


# experiments may be a mapping name -> experiment (so a second --configfile changes one experiment)
sys.path.insert(0, workflow.basedir)
from sourceflow.config import normalize_experiments, validate_config  # noqa: E402

normalize_experiments(config)
validate_config(config)  # one line naming the key (Snakemake's validate prints the schema)
validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/spec.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/latents.smk"
include: "workflow/rules/gmm.smk"
include: "workflow/rules/captions.smk"
include: "workflow/rules/reference.smk"
include: "workflow/rules/reflow.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


onstart:
    # a run (not a dry run) stops here, before any job, when an external input the config names is missing
    if MISSING_INPUTS:
        raise WorkflowError(f"{len(MISSING_INPUTS)} external input(s) missing (listed above); nothing was run")


rule all:
    default_target: True
    input:
        artifact_outputs(),
        report_outputs(),
