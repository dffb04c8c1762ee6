# Sampling: one job per run over the configured solver x steps sweep (skips entries already written;
# image stores resume at the first unwritten shard).


rule sample:
    input:
        unpack(sample_inputs),
    output:
        index=f"{R}/{{dataset}}/runs/{{exp}}/seed{{seed}}/samples/index.json",
    params:
        data=run_data_args,
        guide=guide_args,
        out=lambda wc: f"{run_dir(wc.dataset, wc.exp, wc.seed)}/samples",
        threads=lambda wc: SPECS[wc.exp]["train"]["threads"],
        launch=sample_launcher,
    log:
        f"{R}/logs/{{dataset}}/{{exp}}/seed{{seed}}/sample.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/{{exp}}/seed{{seed}}/sample.tsv"
    conda:
        "../../envs/sourceflow.yaml"
    threads: lambda wc: SPECS[wc.exp]["train"]["threads"]
    priority: 1  # long jobs first, so the short ones fill both cores at the end
    resources:
        gpu=run_gpu("sample"),
        mem_mb=2000,
        runtime=30,
        nodes=1,  # torchrun --standalone over the job's GPUs: one task on one node
    shell:
        "{params.launch} stages/sample.py --spec {input.spec:q} {params.data} --model {input.model:q} {params.guide} "
        "--out {params.out:q} --seed {wildcards.seed} --threads {params.threads} > {log:q} 2>&1"
