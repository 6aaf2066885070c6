"""The orchestrator in the controller: informers on Providers, Plans and Migrations, a
work queue each, and the reconcilers they drive (:func:`run_forklift`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from controller.forklift.cluster import LocalApi
from controller.forklift.migration import MigrationReconciler
from controller.forklift.plan import PlanReconciler
from controller.forklift.provider import ProviderReconciler, TokenConnector
from controller.objects import StoreSource
from controller.store import Store
from vmferry.informer import Informer, Key, WorkQueue

Obj = dict[str, Any]
PROVIDER_CA_DIR = "forklift-provider-cas"  # under the controller's data_dir


def _requeueing(
    queue: WorkQueue, reconcile: Callable[[Key], Awaitable[float | None]]
) -> Callable[[Key], Awaitable[None]]:
    """A reconcile that says when to look again, as a work queue's reconcile."""

    async def run(key: Key) -> None:
        again = await reconcile(key)
        if again is not None:
            queue.add_after(key, again)

    return run


async def run_forklift(store: Store, data_dir: Path) -> None:
    """Run the Provider, Plan and Migration reconcilers until cancelled."""
    home = LocalApi(store)
    connector = TokenConnector(home, data_dir / PROVIDER_CA_DIR)
    source = StoreSource(store)
    providers = Informer(source, "Provider")
    plans = Informer(source, "Plan")
    migrations = Informer(source, "Migration")
    provider_queue, plan_queue, migration_queue = WorkQueue(), WorkQueue(), WorkQueue()
    providers.add_handler(lambda key, old, new: provider_queue.add(key))
    plans.add_handler(lambda key, old, new: plan_queue.add(key))
    migrations.add_handler(lambda key, old, new: migration_queue.add(key))

    def providers_changed(key: Key, old: Obj | None, new: Obj | None) -> None:
        for plan_key in list(plans.cache):  # a plan's readiness follows its providers'
            plan_queue.add(plan_key)

    providers.add_handler(providers_changed)
    secrets = Informer(source, "Secret")

    def secret_changed(key: Key, old: Obj | None, new: Obj | None) -> None:
        for provider_key, provider in list(providers.cache.items()):  # its token or CA
            ref = (provider.get("spec") or {}).get("secret") or {}
            if (ref.get("namespace") or provider_key[0], ref.get("name")) == key:
                provider_queue.add(provider_key)

    secrets.add_handler(secret_changed)
    provider_reconciler = ProviderReconciler(home, connector)
    plan_reconciler = PlanReconciler(home)
    migration_reconciler = MigrationReconciler(home, connector)
    try:
        async with asyncio.TaskGroup() as tg:
            for informer in (providers, plans, migrations, secrets):
                tg.create_task(informer.run())
            for informer in (providers, plans, migrations, secrets):
                await informer.synced.wait()
            tg.create_task(
                provider_queue.run(
                    _requeueing(provider_queue, provider_reconciler.reconcile), "forklift-providers"
                )
            )
            tg.create_task(plan_queue.run(plan_reconciler.reconcile, "forklift-plans"))
            tg.create_task(
                migration_queue.run(
                    _requeueing(migration_queue, migration_reconciler.reconcile),
                    "forklift-migrations",
                )
            )
    finally:
        await connector.close()
