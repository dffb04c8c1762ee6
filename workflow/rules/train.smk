# Training: one job per (experiment, seed); resumes from its checkpoint after a kill.


rule train:
    input:
        unpack(run_data_inputs),
        unpack(reflow_train_inputs),
        spec=spec_file("train"),
    output:
        model=f"{R}/{{dataset}}/runs/{{exp}}/seed{{seed}}/model.safetensors",
        summary=f"{R}/{{dataset}}/runs/{{exp}}/seed{{seed}}/train_summary.json",
    params:
        data=run_data_args,
        reflow=reflow_train_args,
        launch=train_launcher,
        out=lambda wc: run_dir(wc.dataset, wc.exp, wc.seed),
        threads=lambda wc: SPECS[wc.exp]["train"]["threads"],
    log:
        f"{R}/logs/{{dataset}}/{{exp}}/seed{{seed}}/train.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/{{exp}}/seed{{seed}}/train.tsv"
    conda:
        "../../envs/sourceflow.yaml"
    threads: lambda wc: SPECS[wc.exp]["train"]["processes"] * SPECS[wc.exp]["train"]["threads"]
    priority: 2  # long jobs first, so the short ones fill both cores at the end
    resources:
        gpu=run_gpu("train"),
        nodes=1,  # torchrun --standalone: one task on one node (multi-node training is refused by the launcher)
        mem_mb=train_mem_mb,  # the resource plan's host memory of the run (4000 MB without GPUs)
        runtime=120,
    shell:
        "{params.launch} stages/train.py --spec {input.spec:q} {params.data} {params.reflow} "
        "--out {params.out:q} --seed {wildcards.seed} --threads {params.threads} > {log:q} 2>&1"
