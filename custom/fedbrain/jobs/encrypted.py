"""FedAvg over CKKS-encrypted weight differences (TenSEAL through FLARE's own HE components).

Composed here rather than with FLARE's FedAvgRecipeWithHE because that recipe has one client
app for all sites and appends any added result filter *after* its encryptor, where a privacy
filter would see ciphertext. Here each site's result filters are, in order:

1. the privacy filters (personal-head exclusion; later clipping and DP noise), on plaintext;
2. ``HEModelEncryptor`` (via fedbrain's timed subclass: weighs the difference by the site's step count, then encrypts).

The server holds only the public CKKS context: it sums ciphertexts (HEInTimeAccumulate...),
adds the encrypted mean difference to the global model (HEModelShareableGenerator) and
persists that global model encrypted (HEModelSerializeFilter). Sites decrypt what they receive.
"""

from __future__ import annotations

from nvflare.apis.dxo import DataKind
from nvflare.apis.fl_constant import ConfigVarName
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
from nvflare.app_opt.he.model_serialize_filter import HEModelSerializeFilter
from nvflare.app_opt.he.model_shareable_generator import HEModelShareableGenerator
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.app_opt.pt.job_config.base_fed_job import BaseFedJob
from nvflare.app_opt.pt.job_config.model import PTModel
from nvflare.client.config import ExchangeFormat, TransferType
from nvflare.fuel.utils.constants import FrameworkType
from nvflare.job_config.defs import FilterType
from nvflare.job_config.script_runner import ScriptRunner
from nvflare.recipe.spec import ExecEnv, Recipe
from nvflare.recipe.utils import recipe_model_to_job_model

from fedbrain.filters.audit import ReceivedUpdateAudit
from fedbrain.filters.he import SharedPartDecryptor, TimedEncryptor, TimedHEAggregator

SERIALIZE_FILTER_ID = "model_serialize_filter"


class EncryptedFedAvgRecipe(Recipe):
    def __init__(self, config, *, site_script: str, key_metric: str, personal_names=(), sites=None):
        from fedbrain.jobs import site_privacy_filters

        job = BaseFedJob(name=config.name, min_clients=config.min_clients, key_metric=key_metric)
        model = recipe_model_to_job_model(config.model_spec())
        persistor = PTFileModelPersistor(model=model, filter_id=SERIALIZE_FILTER_ID)
        job.comp_ids.update(job.to_server(PTModel(model=model, persistor=persistor)))
        job.to_server(HEModelSerializeFilter(), id=SERIALIZE_FILTER_ID)  # the persisted global model stays encrypted
        aggregator_id = job.to_server(
            TimedHEAggregator(expected_data_kind=DataKind.WEIGHT_DIFF, weigh_by_local_iter=False,
                              min_responses=config.min_responses or config.min_clients,
                              min_trained_sites=config.min_trained_sites),
            id="aggregator")  # sites weigh by their step count before encrypting
        generator_id = job.to_server(HEModelShareableGenerator(), id="shareable_generator")
        # The round policy (docs/reliability.md): FLARE's ScatterAndGather waits for every site up to
        # round_timeout, and a round needs min_responses updates; dead_site_grace as in plaintext jobs.
        timeout = int(config.round_timeout)
        job.to_server(ScatterAndGather(min_clients=config.min_responses or config.min_clients, num_rounds=config.rounds,
                                       wait_time_after_min_received=timeout, train_timeout=timeout,
                                       aggregator_id=aggregator_id, persistor_id=job.comp_ids["persistor_id"],
                                       shareable_generator_id=generator_id))
        job.to_server({ConfigVarName.DEAD_CLIENT_GRACE_PERIOD: float(config.dead_site_grace)})
        job.to_server(ReceivedUpdateAudit(), filter_type=FilterType.TASK_RESULT, tasks=["train"])

        for site in (sites or [None]):
            def place(obj, **kwargs):
                return job.to(obj, site, **kwargs) if site else job.to_clients(obj, **kwargs)

            place(ScriptRunner(script=site_script, script_args=f"--config {config.to_argument()}",
                               framework=FrameworkType.PYTORCH, server_expected_format=ExchangeFormat.NUMPY,
                               params_transfer_type=TransferType.DIFF))
            place(SharedPartDecryptor(), tasks=["train", "validate"], filter_type=FilterType.TASK_DATA)
            # Privacy filters first, on plaintext; the encryptor last.
            for privacy_filter in site_privacy_filters(config, personal_names):
                place(privacy_filter, tasks=["train"], filter_type=FilterType.TASK_RESULT)
            place(TimedEncryptor(weigh_by_local_iter=True), tasks=["train"], filter_type=FilterType.TASK_RESULT)
            place(TimedEncryptor(weigh_by_local_iter=False), tasks=["submit_model"],
                  filter_type=FilterType.TASK_RESULT)
        Recipe.__init__(self, job)

    def process_env(self, env: ExecEnv):
        from nvflare.recipe.sim_env import SimEnv

        if isinstance(env, SimEnv):
            raise ValueError("encrypted jobs need HE-provisioned kits (POC or production), not the simulator")
        super().process_env(env)
