"""Write the model card (README.md, plots/) of a trained M3EL folder:

    python hub_card/make_card.py RUN/model --log RUN/log.jsonl --model-id user/m3el-wikimel
"""

import argparse
import sys

from modeling_m3el.model_card import write_model_card


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a training run's model/ folder, or a folder built by m3el export")
    parser.add_argument("--log", default=None, help="the run's log.jsonl (default: found next to the folder)")
    parser.add_argument("--model-id", default=None, help="the Hub repo the usage snippets load (default: the folder)")
    parser.add_argument("--dataset-name", default=None, help="the benchmark's name (default: from the run's config)")
    parser.add_argument("--dataset-id", default=None, help="the benchmark's Hub dataset id, if it has one")
    parser.add_argument("--no-plots", action="store_true", help="tables only, no plots/ (no matplotlib needed)")
    args = parser.parse_args(argv)
    path = write_model_card(args.model_dir, log_path=args.log, model_id=args.model_id, dataset_name=args.dataset_name,
                            dataset_id=args.dataset_id, plots=not args.no_plots)
    print(f"Model card written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
