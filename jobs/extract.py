"""Extract: audio files (a manifest or a folder of class sub-folders) -> embeddings Delta table.

Lists the input files, skips those the embeddings table already holds for this extractor, and
in the executors reads the others (local files directly, any other Hadoop filesystem through
Spark's binaryFile source), decodes them (soundfile), resamples to 16 kHz mono and embeds them
(extract.extractor: logmel, or torchscript with extract.model_path). Every input file ends in
the embeddings table or in the rejects table with its reason; the counts are printed per stage
and at the end. Reruns append only new files; another extractor version replaces the table.

    spark-submit jobs/extract.py --conf-file conf/local.yaml extract.input=lake/dataset/manifest.csv
    spark-submit jobs/extract.py --conf-file conf/local.yaml extract.input=/data/ESC-50/audio-by-class \\
        extract.extractor=torchscript extract.model_path=/models/encoder.pt

Embeddings computed elsewhere (a Parquet file or folder with clip_id and embedding columns, or a
folder of NAME.npy + NAME.parquet) are written as they are, with extractor 'external'
(audiohash.external; README "Bring your own embeddings"):

    spark-submit jobs/extract.py --conf-file conf/local.yaml extract.input=/data/clap.parquet \
        extract.external_version=clap-2023
"""
from audiohash.cli import job_parser, run_job


def main(cfg, args):
    from audiohash.spark import runs

    return runs.extract(cfg)


if __name__ == "__main__":
    run_job(main, job_parser(__doc__))
