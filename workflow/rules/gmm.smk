# Mixtures over global descriptors (for toy data: the points), used by MM-FM.


rule fit_cls_gmm:
    input:
        data=f"{R}/{{dataset}}/toy.safetensors",
    output:
        gmm=f"{R}/{{dataset}}/points/gmm/cls_K{{K}}.safetensors",
        report=f"{R}/{{dataset}}/points/gmm/cls_K{{K}}.json",
    log:
        f"{R}/logs/{{dataset}}/fit_cls_gmm_K{{K}}.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/fit_cls_gmm_K{{K}}.tsv"
    conda:
        "../../envs/torch.yaml"
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=30,
    shell:
        "python stages/fit_cls_gmm.py --data {input.data} --components {wildcards.K} --out {output.gmm} > {log} 2>&1"
