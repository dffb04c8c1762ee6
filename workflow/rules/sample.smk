# Sampling: one job per run over the configured solver x steps sweep (skips entries already written).


rule sample:
    input:
        spec=spec_file("sample"),
        model=f"{R}/{{dataset}}/runs/{{exp}}/seed{{seed}}/model.safetensors",
        data=data_file,
        gmm=gmm_file,
    output:
        index=f"{R}/{{dataset}}/runs/{{exp}}/seed{{seed}}/samples/index.json",
    params:
        gmm=gmm_flag,
        out=lambda wc: f"{run_dir(wc.dataset, wc.exp, wc.seed)}/samples",
    log:
        f"{R}/logs/{{dataset}}/{{exp}}/seed{{seed}}/sample.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/{{exp}}/seed{{seed}}/sample.tsv"
    conda:
        "../../envs/torch.yaml"
    priority: 1  # long jobs first, so the short ones fill both cores at the end
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=30,
    shell:
        "python stages/sample.py --spec {input.spec} --data {input.data} {params.gmm} --model {input.model} "
        "--out {params.out} --seed {wildcards.seed} > {log} 2>&1"
