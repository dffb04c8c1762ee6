# Captions (CSFM's condition): a caption JSONL joined to the manifest by relative path, then embedded
# with a text encoder into a Zarr store aligned to the manifest.


rule align_captions:
    input:
        manifest=f"{R}/{{dataset}}/manifest.parquet",
    output:
        aligned=f"{R}/{{dataset}}/captions/aligned.parquet",
        report=f"{R}/{{dataset}}/captions/match_report.json",
    params:
        captions=caption_file,
        cap=lambda wc: {k: v for k, v in caption_spec(wc).items() if k != "text_encoders"},
        prefix=lambda wc: shq(caption_spec(wc)["strip_prefix"]),  # '' when empty (Snakemake's :q gives nothing)
    log:
        f"{R}/logs/{{dataset}}/align_captions.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/align_captions.tsv"
    conda:
        "../../envs/sourceflow.yaml"
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=30,
    shell:
        "python stages/align_captions.py --manifest {input.manifest:q} --captions {params.captions:q} "
        "--path-field {params.cap[path_field]} --caption-field {params.cap[caption_field]} "
        "--prefix {params.prefix} --split train --min-match-fraction {params.cap[min_match_fraction]} "
        "--out {output.aligned:q} > {log:q} 2>&1"


rule embed_captions:
    input:
        aligned=f"{R}/{{dataset}}/captions/aligned.parquet",
        manifest=f"{R}/{{dataset}}/manifest.parquet",
    output:
        directory(f"{R}/{{dataset}}/captions/{{text_encoder}}.zarr"),
    params:
        te=text_encoder_spec,
        weights=lambda wc: f"--text-weights {shq(text_encoder_spec(wc)['weights'])}" if text_encoder_spec(wc)["weights"] else "",
        device=lambda wc, resources: "cuda" if resources.gpu else "cpu",
        layout=lambda wc: f"--dtype {text_encoder_spec(wc)['dtype']}" + (" --trim" if text_encoder_spec(wc)["trim"] else ""),
    log:
        f"{R}/logs/{{dataset}}/embed_captions_{{text_encoder}}.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/embed_captions_{{text_encoder}}.tsv"
    conda:
        "../../envs/sourceflow.yaml"
    threads: 4
    resources:
        gpu=lambda wc: int(text_encoder_spec(wc)["kind"] == "clip"),
        mem_mb=8000,
        runtime=120,
    shell:
        "python stages/embed_captions.py --aligned {input.aligned:q} --manifest {input.manifest:q} --split train "
        "--text-encoder {params.te[kind]} {params.weights} --max-length {params.te[max_length]} "
        "--batch-size {params.te[batch_size]} {params.layout} --device {params.device} --threads {threads} --out {output:q} > {log:q} 2>&1"
