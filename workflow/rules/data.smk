# Datasets: toy 2-D distributions drawn once into train/test splits.


rule make_toy_data:
    output:
        data=f"{R}/{{dataset}}/toy.safetensors",
        plot=report(f"{R}/{{dataset}}/toy.png", caption="../report/toy_data.rst", category="Data"),
    params:
        ds=lambda wc: config["datasets"][wc.dataset],
    log:
        f"{R}/logs/{{dataset}}/make_toy_data.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/make_toy_data.tsv"
    conda:
        "../../envs/sourceflow.yaml"
    resources:
        gpu=0,
        mem_mb=1000,
        runtime=10,
    shell:
        "python stages/make_toy_data.py --distribution {params.ds[distribution]} --n-train {params.ds[n_train]} "
        "--n-test {params.ds[n_test]} --seed {params.ds[seed]} --out {output.data:q} --plot {output.plot:q} > {log:q} 2>&1"


rule prepare_data:
    output:
        manifest=f"{R}/{{dataset}}/manifest.parquet",
        meta=f"{R}/{{dataset}}/manifest.json",
        skipped=f"{R}/{{dataset}}/skipped.csv",
    params:
        args=prepare_data_args,
        # only the keys this stage reads (the whole dataset entry would rerun it for any GMM/caption change)
        ds=lambda wc: {k: dataset(wc)[k] for k in ("resolution", "test_fraction", "on_bad_image", "seed")},
    log:
        f"{R}/logs/{{dataset}}/prepare_data.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/prepare_data.tsv"
    conda:
        "../../envs/sourceflow.yaml"
    threads: lambda wc: config["datasets"][wc.dataset].get("workers", 1)
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=240,
    shell:
        "python stages/prepare_data.py {params.args} --resolution {params.ds[resolution]} "
        "--test-fraction {params.ds[test_fraction]} --on-bad-image {params.ds[on_bad_image]} "
        "--workers {threads} --seed {params.ds[seed]} --out {output.manifest:q} > {log:q} 2>&1"
