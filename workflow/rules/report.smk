# The report: metrics.csv (long form), summary.md, W2-vs-NFE (toy) and FD-vs-NFE (images) plots, sample
# grids and training curves.


rule report:
    input:
        metrics=[f"{run_dir(d, e, s)}/metrics/all.json" for d, e, s in runs()],
        data=[f"{R}/{d}/toy.safetensors" for d in run_datasets(False)],
        reference=[f"{R}/{d}/reference/points_w2.json" for d in run_datasets(False)],
        manifests=[f"{R}/{d}/manifest.parquet" for d in run_datasets(True)],
        fd_reference=[fd_reference(d) for d in run_datasets(True)],
    output:
        csv=f"{R}/report/metrics.csv",
        summary=report_file("summary.md", "summary.rst", "Results"),
        curves=report_file("training_curves.png", "training_curves.rst", "Training"),
        plots=[report_file("w2_vs_nfe.png", "w2_vs_nfe.rst", "Results")] * bool(run_datasets(False))
        + [report_file("fd_vs_nfe.png", "fd_vs_nfe.rst", "Results")] * bool(run_datasets(True)),
        grids=[report_file(f"samples_{d}.png", "samples.rst", "Samples") for d in run_datasets(False) + run_datasets(True)],
    params:
        runs=[run_dir(d, e, s) for d, e, s in runs()],
        data=" ".join(shq(f"{d}={R}/{d}/toy.safetensors") for d in run_datasets(False)),
        reference=" ".join(shq(f"{d}={R}/{d}/reference/points_w2.json") for d in run_datasets(False)),
        images=" ".join(shq(f"{d}={R}/{d}/manifest.parquet") for d in run_datasets(True)),
        fd_reference=" ".join(shq(f"{d}={fd_reference(d)}") for d in run_datasets(True)),
        steps=" ".join(str(s) for s in config["report"]["scatter_steps"]),
        points=config["report"]["scatter_points"],
        grid_steps=" ".join(str(s) for s in config["report"]["grid_steps"]),
        grid_images=config["report"]["grid_images"],
        out=lambda wc, output: os.path.dirname(output.csv),
    log:
        f"{R}/logs/report.log",
    benchmark:
        f"{R}/benchmarks/report.tsv"
    conda:
        "../../envs/sourceflow.yaml"
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=10,
    shell:
        "python stages/report.py --runs {params.runs:q} --data {params.data} --reference {params.reference} "
        "--images {params.images} --fd-reference {params.fd_reference} "
        "--scatter-steps {params.steps} --scatter-points {params.points} "
        "--grid-steps {params.grid_steps} --grid-images {params.grid_images} --out {params.out:q} > {log:q} 2>&1"
