"""The window's link to the core: agent lifecycle, sign-in, settings and target probes.

``AppController`` owns the ``Agent`` and the Qt-free models and signals the
widgets when something changed. Every slow step (keyring,
DNS, HTTP, files) is awaited off the event loop, so the tunnel keeps running
while the person works in the window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from PySide6.QtCore import QObject, Signal

from app.core.agent import Agent, AgentState, AgentStatus
from app.core.auth import RelayTokens, logout
from app.core.autostart import Autostart, autostart_for, launch_command
from app.core.backoff import Backoff
from app.core.config import AgentConfig, Target, load_config, save_config
from app.core.credentials import CredentialStore, KeyringStore, MemoryStore, proxy_entry
from app.core.errors import CredentialError, HandshakeError, SignInError
from app.core.net import connector_from_settings
from app.core.models import (
    GuiSettings,
    ProblemTracker,
    StatusView,
    TargetHealth,
    TrafficHistory,
    ViewState,
    describe_status,
    load_gui_settings,
    notice_for,
    save_gui_settings,
)
from app.core.paths import AppDirs
from app.core.probe import probe_target

from .tasks import TaskSet

logger = logging.getLogger(__name__)

PROBE_INTERVAL_S = 5.0
# The agent's logger; its warnings and errors give the reason a connection failed.
AGENT_LOGGER = "app.core.agent"


@dataclass(frozen=True)
class SetupResult:
    """Result of the setup wizard: where to connect, the sign-in and the targets."""

    relay_url: str
    account: str
    refresh_token: str
    remember: bool
    targets: dict[str, Target]
    device: str


@dataclass(frozen=True)
class Preset:
    """A configuration and a signed-in store handed in from outside, as ``make demo`` does."""

    config: AgentConfig
    store: CredentialStore


class AppController(QObject):
    """Runs the agent for the window and keeps the models it shows."""

    status_changed = Signal()
    config_changed = Signal()
    health_changed = Signal()
    history_resized = Signal()
    notice = Signal(str, str)
    sign_in_needed = Signal()
    quit_requested = Signal()

    def __init__(
        self,
        dirs: AppDirs,
        *,
        keyring: KeyringStore | None = None,
        autostart: Autostart | None = None,
        backoff_factory: Callable[[], Backoff] = Backoff,
        probe_interval: float = PROBE_INTERVAL_S,
        preset: Preset | None = None,
    ) -> None:
        super().__init__()
        self.dirs = dirs
        self.config = AgentConfig()
        self.settings = GuiSettings()
        self.history = TrafficHistory()
        self.health = TargetHealth()
        self.tasks = TaskSet()
        self.keyring = keyring or KeyringStore()
        self.autostart = autostart or autostart_for()
        self.autostart_enabled = False
        self.agent: Agent | None = None
        self.agent_status = AgentStatus(AgentState.SIGNED_OUT, "Sign in to connect.")
        self.error = ""
        self.store: CredentialStore | None = None
        # Password of the proxy user in the config, read from the OS keyring at
        # start or set in the settings. It is "" when none is saved.
        self.proxy_password = ""
        self.started = False
        self._preset = preset
        self._backoff_factory = backoff_factory
        self._probe_interval = probe_interval
        self._agent_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._probe_wake = asyncio.Event()
        self._last_state: ViewState | None = None
        self._was_connected = False
        self._closing = False
        self.problems = ProblemTracker()
        logging.getLogger(AGENT_LOGGER).addHandler(self.problems)

    # State for the views -----------------------------------------------------

    @property
    def needs_setup(self) -> bool:
        config = self.config
        return not (config.relay_url and config.account and config.targets)

    @property
    def preset(self) -> Preset | None:
        return self._preset

    @property
    def signed_in(self) -> bool:
        return self.store is not None

    @property
    def running(self) -> bool:
        return self._agent_task is not None and not self._agent_task.done()

    def view(self, now: float | None = None) -> StatusView:
        return describe_status(self.agent_status, time.time() if now is None else now, self.problems.message, self.error)

    # Start and stop ------------------------------------------------------------

    async def start(self) -> None:
        """Load the settings, start probing targets and connect if a sign-in is saved."""
        if self._preset is not None:
            self.config = self._preset.config
        else:
            self.config = await asyncio.to_thread(load_config, self.dirs.config)
        self.settings = await asyncio.to_thread(load_gui_settings, self.dirs.config)
        self.autostart_enabled = await asyncio.to_thread(self.autostart.is_enabled)
        self.proxy_password = await self._saved_proxy_password(self.config)
        self.history.resize(self.settings.history_events)
        self.health.set_targets(self.config.targets.values())
        self.started = True
        self.config_changed.emit()
        self.history_resized.emit()
        self._probe_task = asyncio.ensure_future(self._probe_forever())

        if self._preset is not None:
            self._start_agent(self._preset.store)
            return
        if self.needs_setup:
            # The wizard opens for a first run, so no "sign-in needed" notification.
            self._last_state = ViewState.SIGNED_OUT
            self._set_status(AgentStatus(AgentState.SIGNED_OUT, "Set up Deskbridge to connect."))
            return
        store = await self._saved_sign_in()
        if store is None:
            self._set_status(AgentStatus(AgentState.SIGNED_OUT, f"Sign in to {self.config.relay_url} to connect."))
            self.sign_in_needed.emit()
            return
        self._start_agent(store)

    async def _saved_sign_in(self) -> CredentialStore | None:
        """Return the keyring if it contains a refresh token for the configured account."""
        if not self.settings.remember_sign_in:
            return None
        try:
            token = await self.keyring.get(self.config.relay_url, self.config.account)
        except CredentialError as exc:
            logger.error("cannot read the saved sign-in: %s", exc)
            self.error = str(exc)
            return None
        return self.keyring if token else None

    async def _saved_proxy_password(self, config: AgentConfig) -> str:
        """Return the proxy user's password from the keyring, or "" if none is saved or the keyring fails."""
        if not config.proxy_username:
            return ""
        try:
            password = await self.keyring.get(proxy_entry(config.proxy_url), config.proxy_username)
        except CredentialError as exc:
            logger.warning("cannot read the password of proxy user %s: %s", config.proxy_username, exc)
            return ""
        if not password and config.proxy_mode == "manual":
            logger.warning("no password is saved for proxy user %s; enter it in the settings if the proxy needs one", config.proxy_username)
        return password or ""

    async def shutdown(self) -> None:
        """Stop probing and the agent and end every window task; the controller is done afterwards."""
        self._closing = True
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
        await self._stop_agent()
        await self.tasks.cancel_all()
        logging.getLogger(AGENT_LOGGER).removeHandler(self.problems)

    def request_quit(self) -> None:
        self.quit_requested.emit()

    # Agent ----------------------------------------------------------------------

    def _start_agent(self, store: CredentialStore) -> None:
        config = self.config
        self.store = store
        self.error = ""
        self.problems.clear()
        self._was_connected = False
        connector = connector_from_settings(
            config.proxy_mode, config.proxy_url, config.proxy_username, self.proxy_password, config.ca_file, config.pin_sha256
        )
        agent = Agent(
            relay_url=config.relay_url,
            device=config.device,
            targets=config.targets,
            tokens=RelayTokens(config.relay_url, config.account, store, connector),
            traffic=self.history,
            on_status=self._set_status,
            backoff=self._backoff_factory(),
            connector=connector,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
            grace=config.grace,
        )
        self.agent = agent
        self._agent_task = asyncio.ensure_future(agent.run())
        self._agent_task.set_name("agent")
        logger.info("agent started for relay %s, account %s, device %s", config.relay_url, config.account, config.device)

    async def _stop_agent(self) -> None:
        agent, task = self.agent, self._agent_task
        self._agent_task = None
        if agent is None or task is None:
            return
        await agent.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if self.agent_status.state is not AgentState.STOPPED:
            self.agent_status = AgentStatus(AgentState.STOPPED, "Disconnected.")
            self.status_changed.emit()

    def _set_status(self, status: AgentStatus) -> None:
        if self._agent_task is None and self.agent is not None and status.state is not AgentState.STOPPED:
            return
        self.agent_status = status
        if status.state is AgentState.CONNECTED:
            self.problems.clear()
        view = self.view()
        notice = notice_for(self._last_state, view, was_connected=self._was_connected)
        if status.state is AgentState.CONNECTED:
            self._was_connected = True
        self._last_state = view.state
        if notice is not None and not self._closing:
            self.notice.emit(notice.title, notice.message)
        self.status_changed.emit()

    def network_changed(self, online: bool) -> None:
        """React to the OS reporting a network change: check the link or retry at once."""
        if online and self.agent is not None and self.running:
            logger.info("the network is back; checking the connection to the relay")
            self.tasks.spawn(self.agent.check_connection("after the network changed"), name="network check")

    def connect_agent(self) -> None:
        """Connect with the current sign-in, or skip the wait if a retry is pending."""
        if self.running:
            assert self.agent is not None
            self.agent.wake()
            return
        if self.store is None:
            self.sign_in_needed.emit()
            return
        self._start_agent(self.store)

    async def disconnect_agent(self) -> None:
        await self._stop_agent()
        self._last_state = ViewState.DISCONNECTED
        self.agent_status = AgentStatus(AgentState.STOPPED, "Disconnected. Press Connect to connect again.")
        self.status_changed.emit()

    async def sign_out(self) -> None:
        """Revoke the sign-in at the relay, delete the saved token and stop the agent."""
        store, config = self.store, self.config
        await self._stop_agent()
        self.store = None
        message = "Signed out. Sign in to connect again."
        if store is not None:
            message = await self._revoke(store, config.relay_url, config.account) or message
        self._last_state = ViewState.SIGNED_OUT
        self.agent_status = AgentStatus(AgentState.SIGNED_OUT, message)
        self.status_changed.emit()

    async def _revoke(self, store: CredentialStore, relay_url: str, account: str) -> str:
        """Revoke and delete one saved sign-in; return a message if part of it failed."""
        problem = ""
        try:
            token = await store.get(relay_url, account)
        except CredentialError as exc:
            logger.error("cannot read the sign-in token to revoke it: %s", exc)
            return f"Signed out, but the keyring failed: {exc}"
        if token:
            try:
                await logout(relay_url, token)
                logger.info("signed out of %s as %s", relay_url, account)
            except (OSError, HandshakeError, SignInError) as exc:
                logger.warning("the relay could not revoke the sign-in (%s); deleting the local token anyway", exc)
                problem = f"Signed out here, but the relay could not revoke the sign-in: {exc}"
        try:
            await store.delete(relay_url, account)
        except CredentialError as exc:
            logger.error("cannot delete the sign-in token: %s", exc)
            problem = f"Signed out, but deleting the saved token failed: {exc}"
        return problem

    # Setup and settings --------------------------------------------------------------

    async def complete_setup(self, result: SetupResult) -> str:
        """Save what the wizard collected and connect; return a warning for the person, if any."""
        old_store, old_config = self.store, self.config
        await self._stop_agent()
        warning = ""
        store: CredentialStore = MemoryStore()
        if result.remember:
            try:
                await self.keyring.set(result.relay_url, result.account, result.refresh_token)
                store = self.keyring
            except CredentialError as exc:
                logger.warning("keeping the sign-in for this run only: %s", exc)
                warning = f"The sign-in lasts for this run only: {exc}"
        if store is not self.keyring:
            await store.set(result.relay_url, result.account, result.refresh_token)

        same_entry = (old_config.relay_url, old_config.account) == (result.relay_url, result.account)
        if old_store is not None and not (same_entry and old_store is store):
            await self._revoke(old_store, old_config.relay_url, old_config.account)

        config = replace(
            old_config, relay_url=result.relay_url, account=result.account, device=result.device, targets=dict(result.targets)
        )
        if self._preset is None:
            await asyncio.to_thread(save_config, self.dirs.config, config)
        self.settings.remember_sign_in = result.remember
        await asyncio.to_thread(save_gui_settings, self.dirs.config, self.settings)
        self._apply_config(config)
        self._start_agent(store)
        return warning

    async def apply_settings(self, config: AgentConfig, settings: GuiSettings, proxy_password: str | None = None) -> str:
        """Save changed settings and apply them; a new relay needs a new sign-in.

        ``proxy_password`` (None keeps the current one) goes to the OS keyring.
        Returns a warning for the person if the keyring could not keep it.
        """
        old = self.config
        if proxy_password is None:
            proxy_password = self.proxy_password
        relay_changed = (config.relay_url, config.account) != (old.relay_url, old.account)
        network_changed = network_settings(config) != network_settings(old) or proxy_password != self.proxy_password
        agent_changed = relay_changed or network_changed or config.device != old.device or config.targets != old.targets
        warning = await self._save_proxy_password(old, config, proxy_password) if network_changed else ""

        if settings.start_at_login != self.autostart_enabled:
            if settings.start_at_login:
                await asyncio.to_thread(self.autostart.enable, launch_command())
            else:
                await asyncio.to_thread(self.autostart.disable)
            self.autostart_enabled = settings.start_at_login
        if self._preset is None:
            await asyncio.to_thread(save_config, self.dirs.config, config)
        await asyncio.to_thread(save_gui_settings, self.dirs.config, settings)

        resized = settings.history_events != self.settings.history_events
        self.settings = settings
        if resized:
            self.history.resize(settings.history_events)
            self.history_resized.emit()
        self._apply_config(config)

        if relay_changed:
            await self._stop_agent()
            self.store = None
            self._last_state = ViewState.SIGNED_OUT
            self.agent_status = AgentStatus(AgentState.SIGNED_OUT, f"Sign in to {config.relay_url} to connect.")
            self.status_changed.emit()
            self.sign_in_needed.emit()
        elif agent_changed and self.running and self.store is not None:
            logger.info("settings changed; reconnecting with the new settings")
            await self._stop_agent()
            self._start_agent(self.store)
        return warning

    async def _save_proxy_password(self, old: AgentConfig, config: AgentConfig, password: str) -> str:
        """Save the proxy user's password in the keyring and keep it here; return a warning if the keyring failed.

        The keyring entry belongs to the proxy URL and user, whatever the proxy
        mode. An empty password, or a proxy URL or user that changed, deletes
        the entry that is no longer used.
        """
        new_entry = (config.proxy_url, config.proxy_username) if config.proxy_username else None
        old_entry = (old.proxy_url, old.proxy_username) if old.proxy_username else None
        self.proxy_password = password if new_entry is not None else ""
        stale = [entry for entry in (old_entry, new_entry) if entry is not None and (entry != new_entry or not password)]
        for url, username in dict.fromkeys(stale):
            try:
                await self.keyring.delete(proxy_entry(url), username)
            except CredentialError as exc:
                logger.warning("cannot delete the saved password of proxy user %s: %s", username, exc)
        if new_entry is None or not password:
            return ""
        try:
            await self.keyring.set(proxy_entry(config.proxy_url), config.proxy_username, password)
        except CredentialError as exc:
            logger.warning("keeping the password of proxy user %s for this run only: %s", config.proxy_username, exc)
            return f"The proxy password lasts until Deskbridge quits, because the OS keyring could not save it. {exc}"
        return ""

    def _apply_config(self, config: AgentConfig) -> None:
        self.config = config
        self.health.set_targets(config.targets.values())
        self._probe_wake.set()
        self.config_changed.emit()
        self.health_changed.emit()

    # Target probes --------------------------------------------------------------------

    def probe_now(self) -> None:
        self._probe_wake.set()

    async def _probe_forever(self) -> None:
        while True:
            self._probe_wake.clear()
            targets = list(self.config.targets.values())
            if targets:
                results = await asyncio.gather(*(probe_target(target) for target in targets))
                checked = time.time()
                for target, result in zip(targets, results):
                    self.health.update(target.name, result.ok, result.message, checked)
                self.health_changed.emit()
            try:
                await asyncio.wait_for(self._probe_wake.wait(), self._probe_interval)
            except asyncio.TimeoutError:
                pass


def network_settings(config: AgentConfig) -> tuple[str, str, str, str, str]:
    """Return the settings that shape the agent's connections to the relay."""
    return (config.proxy_mode, config.proxy_url, config.proxy_username, config.ca_file, config.pin_sha256)
