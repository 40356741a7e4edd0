"""The ``lightning`` command this package installs (Lightning 2.6 ships none): a generic LightningCLI.

``lightning fit --config recipes/smollm2.yaml`` (and ``validate``, ``--print_config``, command-line overrides):
the model and data classes come from the YAML's ``class_path``.
"""

from __future__ import annotations


def main(args: list[str] | None = None) -> None:
    try:
        from lightning.pytorch.cli import LightningCLI
    except ImportError as error:
        raise SystemExit(f"training needs the train extra: pip install 'hf_dashkv[train]' ({error})") from error
    import lightning_modules  # noqa: F401  (so short class names in recipes resolve)

    LightningCLI(
        args=args,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
    )
    # A DDP run leaves its gloo process group for interpreter teardown, where gloo's worker threads can abort the
    # process after a finished fit ("terminate called without an active exception", exit -6: seen once in CI;
    # pytorch/pytorch#179291). Destroying it here, while the interpreter is whole, ends the run cleanly.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
