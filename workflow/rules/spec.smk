# Experiment specs: the resolved settings of each experiment, split by the stage that reads them, so
# that changing a sampling setting reruns sample/evaluate but not train. Written in the Snakemake
# process (no job start-up: profiles/default sets force-use-threads); the param is a short hash, so dry-run
# reasons stay readable.


localrules:
    experiment_spec,


rule experiment_spec:
    output:
        f"{R}/{{dataset}}/runs/{{exp}}/spec_{{stage}}.json",
    params:
        spec_hash=lambda wc: stage_spec_hash(wc.exp, wc.stage),
    log:
        f"{R}/logs/{{dataset}}/{{exp}}/spec_{{stage}}.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/{{exp}}/spec_{{stage}}.tsv"
    run:
        write_stage_spec(wildcards.exp, wildcards.stage, output[0], log[0])
