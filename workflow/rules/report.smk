# The report: metrics.csv (long form), summary.md, W2-vs-NFE plot and sample grids.


rule report:
    input:
        metrics=[f"{run_dir(d, e, s)}/metrics/all.json" for d, e, s in runs()],
        data=sorted({f"{R}/{d}/toy.safetensors" for d, _, _ in runs()}),
        reference=sorted({f"{R}/{d}/reference/points_w2.json" for d, _, _ in runs()}),
    output:
        csv=f"{R}/report/metrics.csv",
        summary=report(f"{R}/report/summary.md", caption="../report/summary.rst", category="Results"),
        w2=report(f"{R}/report/w2_vs_nfe.png", caption="../report/w2_vs_nfe.rst", category="Results"),
        curves=report(f"{R}/report/training_curves.png", caption="../report/training_curves.rst", category="Training"),
        grids=[
            report(f"{R}/report/samples_{d}.png", caption="../report/samples.rst", category="Samples")
            for d in sorted({d for d, _, _ in runs()})
        ],
    params:
        runs=[run_dir(d, e, s) for d, e, s in runs()],
        data=" ".join(sorted({f"{d}={R}/{d}/toy.safetensors" for d, _, _ in runs()})),
        reference=" ".join(sorted({f"{d}={R}/{d}/reference/points_w2.json" for d, _, _ in runs()})),
        steps=" ".join(str(s) for s in config["report"]["scatter_steps"]),
        points=config["report"]["scatter_points"],
        out=lambda wc, output: os.path.dirname(output.csv),
    log:
        f"{R}/logs/report.log",
    benchmark:
        f"{R}/benchmarks/report.tsv"
    conda:
        "../../envs/eval.yaml"
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=10,
    shell:
        "python stages/report.py --runs {params.runs} --data {params.data} --reference {params.reference} "
        "--scatter-steps {params.steps} "
        "--scatter-points {params.points} --out {params.out} > {log} 2>&1"
