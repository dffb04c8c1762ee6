# Encoder latents of an image dataset: a Zarr store per encoder (CLS descriptors, spatial latents,
# optional flipped rows) and the per-position statistics that normalize the spatial latents.


rule extract_latents:
    input:
        manifest=f"{R}/{{dataset}}/manifest.parquet",
    output:
        # The store is written in place shard by shard (so a killed job resumes); this report is written
        # only after every shard is verified and the store is marked complete.
        done=f"{R}/{{dataset}}/{{encoder}}/latents.json",
    params:
        args=encoder_args,
        launch=extract_launcher,
        store=lambda wc: latents_store(wc.dataset, wc.encoder),
        device=lambda wc, resources: "cuda" if resources.gpu else "cpu",
    log:
        f"{R}/logs/{{dataset}}/{{encoder}}/extract_latents.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/{{encoder}}/extract_latents.tsv"
    conda:
        "../../envs/sourceflow.yaml"
    threads: lambda wc: encoder_spec(wc)["processes"]
    resources:
        gpu=lambda wc: int(encoder_spec(wc)["gpu"]) * encoder_spec(wc)["processes"],
        mem_mb=8000,
        runtime=240,
    shell:
        "{params.launch} stages/extract_latents.py --manifest {input.manifest:q} --split train {params.args} "
        # --overwrite: a store left by other settings (Snakemake reran because they changed) starts over;
        # with the same settings the stage resumes where a killed run stopped.
        "--device {params.device} --overwrite --out {params.store:q} > {log:q} 2>&1"


rule latent_stats:
    input:
        done=f"{R}/{{dataset}}/{{encoder}}/latents.json",
    output:
        f"{R}/{{dataset}}/{{encoder}}/latent_stats.safetensors",
    params:
        store=lambda wc: latents_store(wc.dataset, wc.encoder),
        # mean_std or std (RAE: variance only) and its eps, recorded in the file for every reader
        normalize=lambda wc: encoder_spec(wc)["normalize"],
        eps=lambda wc: encoder_spec(wc)["normalize_eps"],
        # all rows, or a seeded subset of stats_images images (RAE/MM-FM: 50k); rows read at a time
        subset=latent_stats_subset,
        batch_rows=lambda wc: encoder_spec(wc)["stats_batch_rows"],
    log:
        f"{R}/logs/{{dataset}}/{{encoder}}/latent_stats.log",
    benchmark:
        f"{R}/benchmarks/{{dataset}}/{{encoder}}/latent_stats.tsv"
    conda:
        "../../envs/sourceflow.yaml"
    threads: 4
    resources:
        gpu=0,
        mem_mb=latent_stats_mem_mb,
        runtime=120,
    shell:
        "python stages/latent_stats.py --store {params.store:q} --normalize {params.normalize} --eps {params.eps} "
        "{params.subset}--batch-rows {params.batch_rows} --threads {threads} --out {output:q} > {log:q} 2>&1"
