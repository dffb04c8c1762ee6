# Mixtures over global descriptors (CLS tokens; for toy data the points themselves), and MM-FM's
# spatial GMM built from them.


rule fit_cls_gmm:
    input:
        unpack(cls_gmm_input),
    output:
        gmm=f"{R}/{{dataset}}/{{encoder}}/gmm/cls_K{{K}}.safetensors",
        report=f"{R}/{{dataset}}/{{encoder}}/gmm/cls_K{{K}}.json",
        labels=f"{R}/{{dataset}}/{{encoder}}/gmm/cls_K{{K}}_labels.safetensors",
        weights=report(f"{R}/{{dataset}}/{{encoder}}/gmm/cls_K{{K}}_weights.png", caption="../report/gmm_weights.rst",
                       category="Artifacts"),
    params:
        args=cls_gmm_args,
        device=gmm_device,
    log:
        f"{R}/logs/{{dataset}}/{{encoder}}/fit_cls_gmm_K{{K}}.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/{{encoder}}/fit_cls_gmm_K{{K}}.tsv"
    conda:
        "../../envs/sourceflow.yaml"
    threads: 8  # torch threads of the chunked EM on CPU (Snakemake scales it down to --cores)
    resources:
        gpu=gmm_gpu,
        mem_mb=8000,
        runtime=240,
    shell:
        "python stages/fit_cls_gmm.py {params.args} --components {wildcards.K} --device {params.device} "
        "--threads {threads} --out {output.gmm:q} > {log:q} 2>&1"


rule cls_posteriors:
    input:
        done=f"{R}/{{dataset}}/{{encoder}}/latents.json",
        gmm=f"{R}/{{dataset}}/{{encoder}}/gmm/cls_K{{K}}.safetensors",
    output:
        f"{R}/{{dataset}}/{{encoder}}/gmm/cls_K{{K}}_top{{topk}}_posteriors.safetensors",
    params:
        store=lambda wc: latents_store(wc.dataset, wc.encoder),
        device=gmm_device,
    log:
        f"{R}/logs/{{dataset}}/{{encoder}}/cls_posteriors_K{{K}}_top{{topk}}.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/{{encoder}}/cls_posteriors_K{{K}}_top{{topk}}.tsv"
    conda:
        "../../envs/sourceflow.yaml"
    threads: 8
    resources:
        gpu=gmm_gpu,
        mem_mb=8000,
        runtime=120,
    shell:
        "python stages/cls_posteriors.py --store {params.store:q} --gmm {input.gmm:q} --top-k {wildcards.topk} "
        "--device {params.device} --threads {threads} --out {output:q} > {log:q} 2>&1"


rule build_spatial_gmm:
    input:
        done=f"{R}/{{dataset}}/{{encoder}}/latents.json",
        stats=f"{R}/{{dataset}}/{{encoder}}/latent_stats.safetensors",
        gmm=f"{R}/{{dataset}}/{{encoder}}/gmm/cls_K{{K}}.safetensors",
        labels=f"{R}/{{dataset}}/{{encoder}}/gmm/cls_K{{K}}_labels.safetensors",
    output:
        gmm=f"{R}/{{dataset}}/{{encoder}}/gmm/spatial_K{{K}}.safetensors",
        report=f"{R}/{{dataset}}/{{encoder}}/gmm/spatial_K{{K}}.json",
    params:
        store=lambda wc: latents_store(wc.dataset, wc.encoder),
        variance=lambda wc: gmm_spec(wc)["variance"],
        budget=lambda wc: gmm_spec(wc)["memory_budget_mb"],
    log:
        f"{R}/logs/{{dataset}}/{{encoder}}/build_spatial_gmm_K{{K}}.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/{{encoder}}/build_spatial_gmm_K{{K}}.tsv"
    conda:
        "../../envs/sourceflow.yaml"
    threads: 8
    resources:
        gpu=0,
        mem_mb=lambda wc: build_spatial_gmm_mem_mb(gmm_spec(wc)["memory_budget_mb"]),  # the plan's formula
        runtime=480,
    shell:
        "python stages/build_spatial_gmm.py --store {params.store:q} --stats {input.stats:q} --cls-gmm {input.gmm:q} "
        "--labels {input.labels:q} --variance {params.variance} --memory-budget-mb {params.budget} "
        "--threads {threads} --out {output.gmm:q} > {log:q} 2>&1"
