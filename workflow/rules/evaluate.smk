# Evaluation: W2 / per-condition W2 / straightness / coupling cost for every sampled sweep entry.


rule evaluate:
    input:
        spec=spec_file("evaluate"),
        samples=f"{R}/{{dataset}}/runs/{{exp}}/seed{{seed}}/samples/index.json",
        summary=f"{R}/{{dataset}}/runs/{{exp}}/seed{{seed}}/train_summary.json",
        data=data_file,
    output:
        metrics=f"{R}/{{dataset}}/runs/{{exp}}/seed{{seed}}/metrics/all.json",
    params:
        samples=lambda wc: f"{run_dir(wc.dataset, wc.exp, wc.seed)}/samples",
        out=lambda wc: f"{run_dir(wc.dataset, wc.exp, wc.seed)}/metrics",
    log:
        f"{R}/logs/{{dataset}}/{{exp}}/seed{{seed}}/evaluate.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/{{exp}}/seed{{seed}}/evaluate.tsv"
    conda:
        "../../envs/eval.yaml"
    threads: 1
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=30,
    shell:
        "python stages/evaluate.py --spec {input.spec} --data {input.data} --samples {params.samples} "
        "--train-summary {input.summary} --out {params.out} --seed {wildcards.seed} --threads {threads} > {log} 2>&1"
