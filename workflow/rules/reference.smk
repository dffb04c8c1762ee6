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
        "../../envs/sourceflow.yaml"
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=10,
    shell:
        "python stages/reference_stats.py --data {input.data:q} --num-points {params.n} --out {output:q} > {log:q} 2>&1"


rule train_feature_net:
    input:
        manifest=f"{R}/{{dataset}}/manifest.parquet",
    output:
        net=f"{R}/{{dataset}}/feature_net/model.safetensors",
        report=f"{R}/{{dataset}}/feature_net/report.json",
    params:
        fn=lambda wc: reference_spec(wc)["feature_net"],
        res=lambda wc: dataset(wc)["resolution"],
        seed=lambda wc: dataset(wc)["seed"],
    log:
        f"{R}/logs/{{dataset}}/train_feature_net.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/train_feature_net.tsv"
    conda:
        "../../envs/sourceflow.yaml"
    threads: 2  # the feature net is deterministic for a fixed thread count
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=30,
    shell:
        "python stages/train_feature_net.py --manifest {input.manifest:q} --resolution {params.res} "
        "--epochs {params.fn[epochs]} --batch-size {params.fn[batch_size]} --lr {params.fn[lr]} "
        "--seed {params.seed} --threads {threads} --out {output.net:q} > {log:q} 2>&1"


rule reference_features:
    input:
        unpack(reference_input),
    output:
        f"{R}/{{dataset}}/reference/{{features}}.npz",
    params:
        args=reference_args,
        device=lambda wc, resources: "cuda" if resources.gpu else "cpu",
    log:
        f"{R}/logs/{{dataset}}/reference_{{features}}.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/reference_{{features}}.tsv"
    conda:
        "../../envs/sourceflow.yaml"
    threads: 4
    resources:
        gpu=lambda wc: int(wc.features == "inception"),
        mem_mb=8000,
        runtime=120,
    shell:
        "python stages/reference_stats.py {params.args} --device {params.device} --threads {threads} --out {output:q} > {log:q} 2>&1"
