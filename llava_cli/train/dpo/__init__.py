"""Preference training (`llava dpo`): the DPO/IPO objective, the reference model, the trainer."""
