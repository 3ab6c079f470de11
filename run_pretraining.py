"""Pre-training entry point (placeholder until the training issue lands).

    accelerate launch run_pretraining.py
"""


def main() -> None:
    print("glip-hf: the training loop is not implemented yet; the model core is (see README).")


if __name__ == "__main__":
    main()
