"""Eval's one engine: a LoRA adapter switched on for adapted requests only, on the same weights."""

from katdata.backends import EngineConfig, Request, SamplingParams, get_backend


def test_transformers_adapter_view_shares_the_weights_and_switches(tmp_path, embedded_model):
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32)
    torch.manual_seed(0)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.mul_(50.0)  # an adapter strong enough to change greedy text
    lora.save_pretrained(tmp_path / "adapter")

    backend = get_backend("transformers", EngineConfig(max_model_len=512, batch_size=4))
    reqs = [Request([{"role": "user", "content": f"Name a fruit, number {i}."}]) for i in range(2)]
    p = SamplingParams(max_tokens=12)
    before = [c[0].text for c in backend.generate(reqs, p)]
    view = backend.with_adapter(str(tmp_path / "adapter"))
    assert view is not None and view.model is backend.model  # one model in memory
    adapted = [c[0].text for c in view.generate(reqs, p)]
    after = [c[0].text for c in backend.generate(reqs, p)]
    assert after == before  # the adapter is off for the base's own calls
    assert adapted != before
    assert [c[0].text for _, c in view.stream(iter([]))] == []
    assert view.config.lora_path == str(tmp_path / "adapter") and backend.config.lora_path is None
    backend.close()
