# Datasets: toy 2-D distributions drawn once into train/test splits.


rule make_toy_data:
    output:
        data=f"{R}/{{dataset}}/toy.safetensors",
        plot=report(f"{R}/{{dataset}}/toy.png", caption="../report/toy_data.rst", category="Data"),
    params:
        ds=lambda wc: config["datasets"][wc.dataset],
    log:
        f"{R}/logs/{{dataset}}/make_toy_data.log",
    conda:
        "../../envs/torch.yaml"
    resources:
        gpu=0,
        mem_mb=1000,
        runtime=10,
    shell:
        "python stages/make_toy_data.py --distribution {params.ds[distribution]} --n-train {params.ds[n_train]} "
        "--n-test {params.ds[n_test]} --seed {params.ds[seed]} --out {output.data} --plot {output.plot} > {log} 2>&1"
