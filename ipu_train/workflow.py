"""The closing steps every script shares, as in the Hugging Face example scripts: train (resuming when asked),
save, evaluate, report metrics, and write the model card."""
import datasets

from .loading import perplexity


def take(dataset, limit):
    """The first `limit` samples (--max_train_samples / --max_eval_samples), for maps and streams alike."""
    if limit is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(limit)
    return dataset.select(range(min(limit, len(dataset))))


def train_and_save(trainer, training_args, last_checkpoint, train_dataset):
    checkpoint = training_args.resume_from_checkpoint or last_checkpoint
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()  # model, tokenizer and ipu_config.json, loadable with from_pretrained
    metrics = dict(result.metrics)
    if not isinstance(train_dataset, datasets.IterableDataset):
        metrics["train_samples"] = len(train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def evaluate_and_report(trainer, eval_dataset, loss_key="eval_loss"):
    """Evaluate; `perplexity` is exp of `loss_key` (the MLM loss for pretraining), inf on overflow."""
    metrics = trainer.evaluate()
    if not isinstance(eval_dataset, datasets.IterableDataset):
        metrics["eval_samples"] = len(eval_dataset)
    metrics["perplexity"] = perplexity(metrics[loss_key])
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics


def publish(trainer, training_args, model_args, data_args, tasks):
    card = {"finetuned_from": model_args.model_name_or_path, "tasks": tasks}
    if data_args.dataset_name is not None:
        card["dataset_tags"] = data_args.dataset_name
        card["dataset"] = " ".join(filter(None, (data_args.dataset_name, data_args.dataset_config_name)))
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)
