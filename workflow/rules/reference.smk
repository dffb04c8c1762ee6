# Reference statistics of real data: the score a perfect generator would get.


rule reference_stats:
    input:
        data=f"{R}/{{dataset}}/toy.safetensors",
    output:
        f"{R}/{{dataset}}/reference/points_w2.json",
    params:
        n=lambda wc: max(s["evaluate"]["num_points"] for s in SPECS.values() if s["data"] == wc.dataset),
    log:
        f"{R}/logs/{{dataset}}/reference_stats.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/reference_stats.tsv"
    conda:
        "../../envs/eval.yaml"
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=10,
    shell:
        "python stages/reference_stats.py --data {input.data} --num-points {params.n} --out {output} > {log} 2>&1"
