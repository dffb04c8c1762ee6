# Evaluation of every sampled sweep entry: toy runs W2 / per-condition W2 / straightness / coupling cost;
# image runs FD, precision / recall, class coverage, straightness, coupling cost.


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        metrics=f"{R}/{{dataset}}/runs/{{exp}}/seed{{seed}}/metrics/all.json",
    params:
        data=evaluate_args,
        samples=lambda wc: f"{run_dir(wc.dataset, wc.exp, wc.seed)}/samples",
        out=lambda wc: f"{run_dir(wc.dataset, wc.exp, wc.seed)}/metrics",
    log:
        f"{R}/logs/{{dataset}}/{{exp}}/seed{{seed}}/evaluate.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/{{exp}}/seed{{seed}}/evaluate.tsv"
    conda:
        "../../envs/sourceflow.yaml"
    threads: 1
    resources:
        gpu=run_gpu("evaluate"),
        mem_mb=4000,
        runtime=30,
    shell:
        "python stages/evaluate.py --spec {input.spec:q} {params.data} --samples {params.samples:q} "
        "--train-summary {input.summary:q} --out {params.out:q} --seed {wildcards.seed} --threads {threads} > {log:q} 2>&1"
