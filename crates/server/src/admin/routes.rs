//! The admin API's routes. Each handler checks its scope, validates its
//! input, acts through the handles in [`AdminState`], records a change in
//! the audit log, and answers JSON. The OpenAPI document is collected from
//! the same registrations that build the router, so the two cannot drift.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use guildchat_protocol::KickReason;
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ErrorBody, Json, OptionalJson, Path, Query, MAX_BODY};
use super::keys::{Caller, Need};
use super::AdminState;
use crate::history::{AuditEntry, PlayerRef, SanctionKind, StoredMsg};
use crate::ids::{GuildId, SceneId, TeamId, UserId};
use crate::moderation::now_ms;
use crate::stats::Stats;
use crate::world::{AnnounceTo, PlayerView, SessionState};

/// Longest mute or ban: ten years. Longer is a permanent sanction in all
/// but name, and keeps the end time far from overflow.
const MAX_SANCTION_SECS: u64 = 10 * 365 * 24 * 3600;

/// Longest announcement, in characters.
const MAX_ANNOUNCE_CHARS: usize = 1000;

/// Longest reason kept in the audit log and with a sanction, in characters.
const MAX_REASON_CHARS: usize = 500;

/// Largest page of audit lines or messages.
const MAX_LIMIT: u32 = 200;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "guildchat admin API",
        description = "Membership, moderation, announcements and operations for a running guildchat. \
                       Authenticate with `Authorization: Bearer <key>`; errors are \
                       `{\"error\": {\"code\", \"message\"}}`."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(ErrorBody))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

fn api() -> OpenApiRouter<AdminState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(stats))
        .routes(routes!(player))
        .routes(routes!(find_player))
        .routes(routes!(groups))
        .routes(routes!(disband))
        .routes(routes!(guild_online))
        .routes(routes!(kick))
        .routes(routes!(mute, unmute))
        .routes(routes!(mutes))
        .routes(routes!(ban, unban))
        .routes(routes!(revoke))
        .routes(routes!(announce))
        .routes(routes!(recall))
        .routes(routes!(messages))
        .routes(routes!(words, replace_words, add_words, remove_words))
        .routes(routes!(filter_test))
        .routes(routes!(audit))
        .routes(routes!(reload))
        .routes(routes!(drain))
}

/// The OpenAPI document, as served at `/v1/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, doc) = api().split_for_parts();
    doc
}

/// The whole admin router: the API, its document, health and metrics.
pub fn router(state: AdminState) -> Router {
    let (api, doc) = api().split_for_parts();
    let doc = std::sync::Arc::new(doc);
    api.route(
        "/v1/openapi.json",
        get(move || {
            let doc = doc.clone();
            async move { axum::Json((*doc).clone()) }
        }),
    )
    .route(
        "/console",
        get(|| async { axum::response::Redirect::permanent("/console/") }),
    )
    .route(
        "/console/",
        get(|| async { console(CONSOLE_HTML, "text/html; charset=utf-8") }),
    )
    .route(
        "/console/console.js",
        get(|| async { console(CONSOLE_JS, "text/javascript; charset=utf-8") }),
    )
    .route(
        "/console/console.css",
        get(|| async { console(CONSOLE_CSS, "text/css; charset=utf-8") }),
    )
    .route("/demo/", get(demo_page))
    .route(
        "/demo/demo.js",
        get(|| async { console(DEMO_JS, "text/javascript; charset=utf-8") }),
    )
    .route("/demo/config", get(demo_config))
    .route("/demo/token", axum::routing::post(demo_token))
    .route("/healthz", get(healthz))
    .route("/readyz", get(readyz))
    .route("/metrics", get(metrics))
    .fallback(not_found)
    .method_not_allowed_fallback(method_not_allowed)
    .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
    .with_state(state)
}

/// The GM console: static files built into the binary, served without a
/// key (every API call the page makes carries the key the operator gives
/// it).
const CONSOLE_HTML: &str = include_str!("console/index.html");
const CONSOLE_JS: &str = include_str!("console/console.js");
const CONSOLE_CSS: &str = include_str!("console/console.css");

const DEMO_HTML: &str = include_str!("console/demo.html");
const DEMO_JS: &str = include_str!("console/demo.js");

/// Whether a request may use the demo: development keys, an admin
/// listener on loopback, and a `Host` that names loopback (so a page from
/// elsewhere cannot reach it through a rebound DNS name).
fn demo_allowed(state: &AdminState, headers: &axum::http::HeaderMap) -> bool {
    let loopback_listener = state
        .config
        .admin
        .listen
        .is_none_or(|a| a.ip().is_loopback());
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let name = host
        .strip_prefix('[')
        .and_then(|h| h.split(']').next())
        .unwrap_or_else(|| host.split(':').next().unwrap_or(""));
    let loopback_host = name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    state.dev_signer.is_some() && loopback_listener && loopback_host
}

fn demo_host(headers: &axum::http::HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    match host.strip_prefix('[') {
        Some(v6) => format!("[{}]", v6.split(']').next().unwrap_or("::1")),
        None => host.split(':').next().unwrap_or("127.0.0.1").to_owned(),
    }
}

/// The game port's URL as the browser should reach it: the host it used
/// for this page, and the game port.
fn game_url(state: &AdminState, headers: &axum::http::HeaderMap) -> Option<String> {
    let addr = state.game_addr.get()?;
    let scheme = if state.config.tls.is_some() {
        "wss"
    } else {
        "ws"
    };
    Some(format!("{scheme}://{}:{}", demo_host(headers), addr.port()))
}

/// The browser demo client: development mode only.
async fn demo_page(
    axum::extract::State(state): axum::extract::State<AdminState>,
    headers: axum::http::HeaderMap,
) -> Response {
    if !demo_allowed(&state, &headers) {
        return ApiError::NotFound("the demo is served with development keys only".into())
            .into_response();
    }
    // The page talks to the game port too, and to nothing else.
    let Some(game) = game_url(&state, &headers) else {
        return ApiError::Unavailable("the game port is not up yet".into()).into_response();
    };
    page(
        DEMO_HTML,
        "text/html; charset=utf-8",
        format!(
            "default-src 'self'; connect-src 'self' {game}; base-uri 'none'; \
             form-action 'none'; frame-ancestors 'none'"
        ),
    )
}

/// Where the demo connects: the game port, as bound.
async fn demo_config(
    axum::extract::State(state): axum::extract::State<AdminState>,
    headers: axum::http::HeaderMap,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    if !demo_allowed(&state, &headers) {
        return Err(ApiError::NotFound("development mode only".into()));
    }
    let url = game_url(&state, &headers)
        .ok_or_else(|| ApiError::Unavailable("the game port is not up yet".into()))?;
    Ok(axum::Json(serde_json::json!({ "url": url })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DemoTokenBody {
    user: u64,
    name: String,
    #[serde(default)]
    guild: u64,
    #[serde(default)]
    team: u64,
    #[serde(default)]
    scene: u64,
}

/// A development token for the demo page (one hour). Never in production:
/// without the development keys, on an admin listener that is not on
/// loopback, or asked through a host that is not loopback, the route
/// answers 404.
async fn demo_token(
    axum::extract::State(state): axum::extract::State<AdminState>,
    headers: axum::http::HeaderMap,
    Json(body): Json<DemoTokenBody>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let Some(signer) = state
        .dev_signer
        .as_ref()
        .filter(|_| demo_allowed(&state, &headers))
    else {
        return Err(ApiError::NotFound("development mode only".into()));
    };
    if body.user == 0
        || body.name.is_empty()
        || body.name.chars().count() > guildchat_protocol::limits::MAX_NAME_CHARS
    {
        return Err(ApiError::Unprocessable(
            "user must be > 0 and name 1 to 32 characters".into(),
        ));
    }
    let now = (now_ms() / 1000) as i64;
    let claims = guildchat_auth::Claims {
        user_id: body.user,
        name: body.name,
        exp: now + 3600,
        guild: body.guild,
        team: body.team,
        scene: body.scene,
        iat: Some(now),
        nbf: None,
        aud: vec![state.config.auth.audience.clone()],
    };
    let token = signer
        .try_mint(&claims)
        .map_err(|e| ApiError::Unavailable(format!("cannot mint: {e}")))?;
    Ok(axum::Json(serde_json::json!({ "token": token })))
}

fn console(body: &'static str, content_type: &'static str) -> Response {
    // Only the console's own files and API: no inline script, no other
    // origin, no framing.
    page(
        body,
        content_type,
        "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            .to_owned(),
    )
}

fn page(body: &'static str, content_type: &'static str, csp: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (header::CONTENT_SECURITY_POLICY, csp),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
            (header::CACHE_CONTROL, "no-cache".to_owned()),
        ],
        body,
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> Response {
    let body = ErrorBody {
        error: super::error::ErrorDetail {
            code: "method_not_allowed".into(),
            message: "this route does not take that method".into(),
        },
    };
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}

// ---------------------------------------------------------------- health

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready: listening, the store writer alive, and the world answering
/// within a second.
async fn readyz(axum::extract::State(state): axum::extract::State<AdminState>) -> Response {
    let listening = state.stats.ready.load(std::sync::atomic::Ordering::Acquire);
    let store = state.history.as_ref().is_none_or(|h| h.is_healthy());
    let world = state.world_answers().await;
    let draining = state.drain.as_ref().is_some_and(|d| d.is_cancelled());
    // A node cut off from NATS keeps its players connected, but cannot
    // acknowledge a line: new connections belong on a node that can.
    let nats = state.cluster.as_ref().is_none_or(|c| c.connected());
    // Likewise a node whose history database is away (`history.url`).
    let database = state.history.as_ref().and_then(|h| h.database_reachable());
    let mut body = serde_json::json!({
        "listening": listening, "store": store, "world": world, "draining": draining,
    });
    if let Some(up) = database {
        body["database"] = match up {
            true => serde_json::json!({ "state": "ok" }),
            false => serde_json::json!({
                "state": "degraded", "reason": "history database unreachable"
            }),
        };
    }
    let database = database.unwrap_or(true);
    if state.cluster.is_some() {
        body["cluster"] = match nats {
            true => serde_json::json!({ "state": "ok" }),
            false => serde_json::json!({ "state": "degraded", "reason": "NATS unreachable" }),
        };
    }
    let status = if listening && store && world && !draining && nats && database {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics(axum::extract::State(state): axum::extract::State<AdminState>) -> Response {
    let text = state
        .stats
        .metrics
        .render(&state.stats, state.world.inbox_depth());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

type State = axum::extract::State<AdminState>;

/// In a cluster: the other node holding the player's session, as the
/// session directory says, to forward a call about the player to.
async fn elsewhere(
    state: &AdminState,
    id: UserId,
) -> Result<Option<(crate::cluster::Cluster, crate::ids::NodeId)>, ApiError> {
    let Some(cluster) = &state.cluster else {
        return Ok(None);
    };
    match state.world.locate(id).await? {
        Some(node) if node != *cluster.node() => Ok(Some((cluster.clone(), node))),
        _ => Ok(None),
    }
}

/// Makes a call about a player on another node.
async fn forward(
    cluster: &crate::cluster::Cluster,
    node: &crate::ids::NodeId,
    call: crate::cluster::calls::Call,
) -> Result<crate::cluster::calls::Answered, ApiError> {
    cluster
        .call(node, &call)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))
}

// ---------------------------------------------------------------- read

#[derive(Serialize, ToSchema)]
struct StatsReply {
    /// Players logged in.
    online: u64,
    max_online: u32,
    /// Open connections, logged in or not.
    connections: u64,
    /// Sessions whose connection dropped, waiting for a resume.
    lingering: u64,
    /// Every counter, by name.
    counters: std::collections::BTreeMap<&'static str, u64>,
    /// In a cluster: the sums over every live node, and each node's own
    /// figures (the fields above are this node's).
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<ClusterStats>,
}

#[derive(Serialize, ToSchema)]
struct ClusterStats {
    /// This node's id.
    node: String,
    /// Players with a session on any live node, as the session directory
    /// says.
    online: u64,
    /// Players with a session, by node, as the session directory says.
    nodes: std::collections::BTreeMap<String, u64>,
    /// Sums over the nodes that answered: sessions without a connection.
    lingering: u64,
    /// Sums over the nodes that answered: open connections.
    connections: u64,
    /// Sums over the nodes that answered: every counter, by name.
    counters: std::collections::BTreeMap<String, u64>,
    /// Each node's own figures, for the nodes that answered.
    by_node: std::collections::BTreeMap<String, NodeFigures>,
    /// Live nodes that did not answer within the call timeout: their
    /// figures are not in the sums.
    unanswered: Vec<String>,
}

#[derive(Serialize, ToSchema)]
struct NodeFigures {
    online: u64,
    lingering: u64,
    connections: u64,
    counters: std::collections::BTreeMap<String, u64>,
}

/// Players online, connections and every counter.
#[utoipa::path(get, path = "/v1/stats", tag = "read",
    responses((status = 200, body = StatsReply), (status = 401, body = ErrorBody)))]
async fn stats(caller: Caller, state: State) -> Result<axum::Json<StatsReply>, ApiError> {
    caller.need(Need::Read)?;
    let (online, lingering) = state.world.counts().await?;
    let cluster = match &state.cluster {
        Some(c) => Some(cluster_stats(&state, c).await?),
        None => None,
    };
    Ok(axum::Json(StatsReply {
        online,
        max_online: state.config.max_online,
        connections: Stats::get(&state.stats.open_connections),
        lingering,
        counters: state.stats.counters().into_iter().collect(),
        cluster,
    }))
}

/// Every live node's figures, this one's read here, the others' asked.
async fn cluster_stats(
    state: &AdminState,
    cluster: &crate::cluster::Cluster,
) -> Result<ClusterStats, ApiError> {
    use crate::cluster::calls::{Answered, Call, NodeStats};
    let live = state.world.sessions_by_node().await?;
    let nodes: std::collections::BTreeMap<String, u64> = live
        .iter()
        .map(|(node, n)| (node.0.to_string(), *n))
        .collect();
    let ids: Vec<crate::ids::NodeId> = live.iter().map(|(node, _)| node.clone()).collect();
    let mut answers = vec![(
        cluster.node().clone(),
        NodeStats::of(&state.world, &state.stats).await?,
    )];
    let mut unanswered = Vec::new();
    for (node, answer) in cluster.call_others(&ids, &Call::Stats).await {
        match answer {
            Ok(Answered::Stats(s)) => answers.push((node, s)),
            // Nobody on its call subject and nobody in the directory: a
            // drained or restarting node, which has nothing to add.
            Err(crate::cluster::ClusterError::Stopped(_)) if holds_nobody(&live, &node) => {}
            _ => unanswered.push(node.0.to_string()),
        }
    }
    let mut out = ClusterStats {
        node: cluster.node().0.to_string(),
        online: nodes.values().sum(),
        nodes,
        lingering: 0,
        connections: 0,
        counters: Default::default(),
        by_node: Default::default(),
        unanswered,
    };
    for (node, s) in answers {
        out.lingering += s.lingering;
        out.connections += s.connections;
        for (name, n) in &s.counters {
            *out.counters.entry(name.clone()).or_default() += n;
        }
        out.by_node.insert(
            node.0.to_string(),
            NodeFigures {
                online: s.online,
                lingering: s.lingering,
                connections: s.connections,
                counters: s.counters,
            },
        );
    }
    Ok(out)
}

/// Whether the session directory gives `node` no session.
fn holds_nobody(live: &[(crate::ids::NodeId, u64)], node: &crate::ids::NodeId) -> bool {
    live.iter().all(|(n, count)| n != node || *count == 0)
}

/// Whether a call to every node may pass over a stopped node that holds
/// no session.
#[derive(Clone, Copy, PartialEq)]
enum Stopped {
    /// The call is about sessions: a node without any has no part in it.
    Skip,
    /// The call is about what a node stores, which outlives its sessions.
    Wait,
}

/// In a cluster: asks every other live node and hands back their answers;
/// one that does not answer makes the whole call a 503 that names it.
/// Alone: nothing to ask.
async fn ask_every_node(
    state: &AdminState,
    call: crate::cluster::calls::Call,
    stopped: Stopped,
) -> Result<Vec<crate::cluster::calls::Answered>, ApiError> {
    let Some(cluster) = &state.cluster else {
        return Ok(Vec::new());
    };
    let live = state.world.sessions_by_node().await?;
    let ids: Vec<crate::ids::NodeId> = live.iter().map(|(node, _)| node.clone()).collect();
    let mut answers = Vec::new();
    let mut silent = Vec::new();
    for (node, answer) in cluster.call_others(&ids, &call).await {
        match answer {
            Ok(a) => answers.push(a),
            // Nobody on its call subject (a drain, a rolling restart) and
            // nobody in the directory.
            Err(crate::cluster::ClusterError::Stopped(_))
                if stopped == Stopped::Skip && holds_nobody(&live, &node) => {}
            Err(_) => silent.push(node.0.to_string()),
        }
    }
    if silent.is_empty() {
        Ok(answers)
    } else {
        Err(ApiError::Unavailable(format!(
            "node {} did not answer",
            silent.join(", ")
        )))
    }
}

#[derive(Serialize, ToSchema)]
struct PlayerReply {
    id: u64,
    name: String,
    /// `connected`, `lingering` or `offline`.
    state: &'static str,
    guild: u64,
    team: u64,
    scene: u64,
    mask: u32,
    /// Unix ms when the mute ends; 0 if not muted.
    muted_until_ms: u64,
    /// Unix ms when the ban ends; 0 if not banned.
    banned_until_ms: u64,
    /// Tokens issued (`iat`) before this Unix second are refused; 0 if
    /// the player's tokens were never revoked.
    tokens_revoked_before_s: u64,
}

fn player_reply(
    state: &AdminState,
    id: UserId,
    view: Option<PlayerView>,
    name: String,
) -> PlayerReply {
    let muted = state.moderation.get(id, SanctionKind::Mute);
    let banned = state.moderation.get(id, SanctionKind::Ban);
    let (st, guild, team, scene, mask, name) = match view {
        Some(v) => (
            match v.state {
                SessionState::Connected => "connected",
                SessionState::Lingering => "lingering",
            },
            v.guild.0,
            v.team.0,
            v.scene.0,
            v.mask,
            v.name,
        ),
        None => ("offline", 0, 0, 0, 0, name),
    };
    PlayerReply {
        id: id.0,
        name,
        state: st,
        guild,
        team,
        scene,
        mask,
        muted_until_ms: muted.map_or(0, |s| s.until_ms),
        banned_until_ms: banned.map_or(0, |s| s.until_ms),
        tokens_revoked_before_s: state.moderation.revoked_before(id).unwrap_or(0),
    }
}

/// The player's name as the store knows it: `None` for a player never seen.
async fn known_name(state: &AdminState, id: UserId) -> Result<Option<String>, ApiError> {
    match &state.history {
        Some(h) => Ok(h.find_player(PlayerRef::Id(id.0)).await?.map(|(_, n)| n)),
        None => Ok(None),
    }
}

/// A player's session state, groups and sanctions.
#[utoipa::path(get, path = "/v1/players/{id}", tag = "read",
    params(("id" = u64, Path, description = "user id")),
    responses((status = 200, body = PlayerReply), (status = 404, body = ErrorBody)))]
async fn player(
    caller: Caller,
    state: State,
    Path(id): Path<u64>,
) -> Result<axum::Json<PlayerReply>, ApiError> {
    caller.need(Need::Read)?;
    let id = UserId(id);
    let mut view = state.world.player(id).await?;
    if view.is_none() {
        if let Some((cluster, node)) = elsewhere(&state, id).await? {
            // A node that cannot answer (dead, or stopped) holds no
            // session anyone can use: the player reads as offline.
            let call = crate::cluster::calls::Call::Player { user: id.0 };
            if let Ok(crate::cluster::calls::Answered::View(v)) =
                forward(&cluster, &node, call).await
            {
                view = v;
            }
        }
    }
    let name = match &view {
        Some(_) => String::new(),
        None => known_name(&state, id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("player {} was never seen", id.0)))?,
    };
    Ok(axum::Json(player_reply(&state, id, view, name)))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct FindQuery {
    /// The exact name the player last logged in with.
    name: String,
}

/// Finds a player by the exact name they last logged in with (online, or
/// known to the store).
#[utoipa::path(get, path = "/v1/players", tag = "read",
    params(FindQuery),
    responses((status = 200, body = PlayerReply), (status = 404, body = ErrorBody)))]
async fn find_player(
    caller: Caller,
    state: State,
    Query(q): Query<FindQuery>,
) -> Result<axum::Json<PlayerReply>, ApiError> {
    caller.need(Need::Read)?;
    let not_found = || ApiError::NotFound(format!("no player named {:?}", q.name));
    if q.name.is_empty() || q.name.chars().count() > guildchat_protocol::limits::MAX_NAME_CHARS {
        return Err(not_found());
    }
    let id = match state.world.find_name(q.name.clone()).await? {
        Some(id) => id,
        None => match &state.history {
            Some(h) => h
                .find_player(PlayerRef::Name(q.name.clone()))
                .await?
                .map(|(id, _)| UserId(id))
                .ok_or_else(not_found)?,
            None => return Err(not_found()),
        },
    };
    let view = state.world.player(id).await?;
    let name = match &view {
        Some(_) => String::new(),
        None => q.name.clone(),
    };
    Ok(axum::Json(player_reply(&state, id, view, name)))
}

#[derive(Serialize, ToSchema)]
struct PlayersReply {
    players: Vec<u64>,
}

/// The members of a guild who are online.
#[utoipa::path(get, path = "/v1/guilds/{gid}/online", tag = "read",
    params(("gid" = u64, Path, description = "guild id")),
    responses((status = 200, body = PlayersReply)))]
async fn guild_online(
    caller: Caller,
    state: State,
    Path(gid): Path<u64>,
) -> Result<axum::Json<PlayersReply>, ApiError> {
    caller.need(Need::Read)?;
    let mut players: Vec<u64> = state
        .world
        .guild_online(GuildId(gid))
        .await?
        .into_iter()
        .map(|u| u.0)
        .collect();
    // In a cluster, the members online on every node.
    let call = crate::cluster::calls::Call::GuildOnline { guild: gid };
    for answer in ask_every_node(&state, call, Stopped::Skip).await? {
        if let crate::cluster::calls::Answered::Players(more) = answer {
            players.extend(more);
        }
    }
    players.sort_unstable();
    players.dedup();
    Ok(axum::Json(PlayersReply { players }))
}

// ---------------------------------------------------------------- logic

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct GroupsBody {
    /// New guild (0 = none); absent = unchanged.
    guild: Option<u64>,
    team: Option<u64>,
    scene: Option<u64>,
}

/// Moves a connected or lingering player to another guild, team or scene,
/// at once. The next login's token sets them again.
#[utoipa::path(put, path = "/v1/players/{id}/groups", tag = "logic",
    params(("id" = u64, Path, description = "user id")),
    request_body = GroupsBody,
    responses((status = 200, body = PlayerReply), (status = 404, body = ErrorBody)))]
async fn groups(
    caller: Caller,
    state: State,
    Path(id): Path<u64>,
    Json(body): Json<GroupsBody>,
) -> Result<axum::Json<PlayerReply>, ApiError> {
    caller.need(Need::Logic)?;
    let id = UserId(id);
    let mut view = state
        .world
        .regroup(
            id,
            body.guild.map(GuildId),
            body.team.map(TeamId),
            body.scene.map(SceneId),
        )
        .await?;
    if view.is_none() {
        if let Some((cluster, node)) = elsewhere(&state, id).await? {
            let call = crate::cluster::calls::Call::Regroup {
                user: id.0,
                guild: body.guild,
                team: body.team,
                scene: body.scene,
            };
            if let crate::cluster::calls::Answered::View(v) = forward(&cluster, &node, call).await?
            {
                view = v;
            }
        }
    }
    let target = format!("player:{}", id.0);
    let detail = format!(
        "guild={:?} team={:?} scene={:?}",
        body.guild, body.team, body.scene
    );
    match view {
        Some(view) => {
            state
                .audit(&caller.id, "groups", target, &detail, "ok")
                .await;
            Ok(axum::Json(player_reply(
                &state,
                id,
                Some(view),
                String::new(),
            )))
        }
        None => {
            state
                .audit(&caller.id, "groups", target, &detail, "not_online")
                .await;
            Err(ApiError::NotFound(format!(
                "player {} is neither connected nor lingering",
                id.0
            )))
        }
    }
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    #[serde(default)]
    reason: String,
}

#[derive(Serialize, ToSchema)]
struct CountReply {
    /// How many players it applied to.
    players: usize,
}

/// Every member of the guild leaves it.
#[utoipa::path(post, path = "/v1/guilds/{gid}/disband", tag = "logic",
    params(("gid" = u64, Path, description = "guild id")),
    request_body(content = Option<ReasonBody>, description = "optional"),
    responses((status = 200, body = CountReply)))]
async fn disband(
    caller: Caller,
    state: State,
    Path(gid): Path<u64>,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<axum::Json<CountReply>, ApiError> {
    caller.need(Need::Logic)?;
    let reason = reason(&body.reason)?;
    if gid == 0 {
        return Err(ApiError::BadRequest("guild 0 means no guild".into()));
    }
    let mut players = state.world.disband(GuildId(gid)).await?;
    // In a cluster, on every node; one that does not answer is a 503
    // (the others have acted: a retry is harmless).
    let call = crate::cluster::calls::Call::Disband { guild: gid };
    let answers = match ask_every_node(&state, call, Stopped::Skip).await {
        Ok(answers) => answers,
        Err(e) => {
            // What was done is audited even so.
            let result = format!("partial: players={players} here, {e}");
            let target = format!("guild:{gid}");
            state
                .audit(&caller.id, "disband", target, reason, &result)
                .await;
            return Err(e);
        }
    };
    for answer in answers {
        if let crate::cluster::calls::Answered::Count(n) = answer {
            players += n;
        }
    }
    state
        .audit(
            &caller.id,
            "disband",
            format!("guild:{gid}"),
            reason,
            &format!("players={players}"),
        )
        .await;
    Ok(axum::Json(CountReply { players }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AnnounceBody {
    text: String,
    guild: Option<u64>,
    team: Option<u64>,
    scene: Option<u64>,
    player: Option<u64>,
    /// The same key within 24 h returns the first msg_id and sends nothing.
    idempotency_key: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct MsgIdReply {
    msg_id: u64,
}

/// A system message to everyone, or to one guild, team, scene or player.
#[utoipa::path(post, path = "/v1/announce", tag = "logic",
    request_body = AnnounceBody,
    responses((status = 200, body = MsgIdReply), (status = 422, body = ErrorBody)))]
async fn announce(
    caller: Caller,
    state: State,
    Json(body): Json<AnnounceBody>,
) -> Result<axum::Json<MsgIdReply>, ApiError> {
    caller.need(Need::Logic)?;
    let text = body.text.trim();
    if text.is_empty() {
        return Err(ApiError::Unprocessable("text is empty".into()));
    }
    if text.chars().count() > MAX_ANNOUNCE_CHARS {
        return Err(ApiError::Unprocessable(format!(
            "text is longer than {MAX_ANNOUNCE_CHARS} characters"
        )));
    }
    let to = match (body.guild, body.team, body.scene, body.player) {
        (None, None, None, None) => AnnounceTo::Everyone,
        (Some(g), None, None, None) if g != 0 => AnnounceTo::Guild(GuildId(g)),
        (None, Some(t), None, None) if t != 0 => AnnounceTo::Team(TeamId(t)),
        (None, None, Some(s), None) if s != 0 => AnnounceTo::Scene(SceneId(s)),
        (None, None, None, Some(p)) if p != 0 => AnnounceTo::Player(UserId(p)),
        _ => {
            return Err(ApiError::Unprocessable(
                "name at most one of guild, team, scene, player, and not 0".into(),
            ))
        }
    };
    let key = match body.idempotency_key {
        Some(k) if k.is_empty() || k.len() > 200 => {
            return Err(ApiError::Unprocessable(
                "idempotency_key must be 1 to 200 bytes".into(),
            ))
        }
        k => k,
    };
    let target = format!("{to:?}");
    let Some(key) = key else {
        let id = state.world.announce(text.to_owned(), to).await?;
        state
            .audit(
                &caller.id,
                "announce",
                target,
                "",
                &format!("msg_id={}", id.0),
            )
            .await;
        return Ok(axum::Json(MsgIdReply { msg_id: id.0 }));
    };
    // On a task of its own, so a caller who hangs up between the send and
    // the record cannot make a retry send again.
    let state = state.0.clone();
    let caller_id = caller.id.clone();
    let text = text.to_owned();
    let msg_id = tokio::spawn(async move {
        let _one_at_a_time = state.announce_lock.lock().await;
        if let Some(msg_id) = state.announce_seen(&key).await? {
            return Ok::<_, ApiError>(msg_id);
        }
        let id = state.world.announce(text, to).await?;
        let msg_id = state.announce_key(key, id.0).await;
        state
            .audit(
                &caller_id,
                "announce",
                target,
                "",
                &format!("msg_id={msg_id}"),
            )
            .await;
        Ok(msg_id)
    })
    .await
    .map_err(|_| ApiError::Unavailable("the announcement stopped".into()))??;
    Ok(axum::Json(MsgIdReply { msg_id }))
}

// ---------------------------------------------------------------- gm

fn reason(r: &str) -> Result<&str, ApiError> {
    if r.chars().count() > MAX_REASON_CHARS {
        return Err(ApiError::Unprocessable(format!(
            "reason is longer than {MAX_REASON_CHARS} characters"
        )));
    }
    Ok(r)
}

/// Ends the player's session at once with an operator-kick notice; a
/// reconnect is a new session.
#[utoipa::path(post, path = "/v1/players/{id}/kick", tag = "gm",
    params(("id" = u64, Path, description = "user id")),
    request_body(content = Option<ReasonBody>, description = "optional"),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn kick(
    caller: Caller,
    state: State,
    Path(id): Path<u64>,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<StatusCode, ApiError> {
    caller.need(Need::Gm)?;
    let reason = reason(&body.reason)?;
    let mut found = state
        .world
        .kick(UserId(id), KickReason::KickOperator)
        .await?;
    if !found {
        if let Some((cluster, node)) = elsewhere(&state, UserId(id)).await? {
            let call = crate::cluster::calls::Call::Kick { user: id };
            found = matches!(
                forward(&cluster, &node, call).await?,
                crate::cluster::calls::Answered::Kicked(true)
            );
        }
    }
    let result = if found { "ok" } else { "not_online" };
    state
        .audit(&caller.id, "kick", format!("player:{id}"), reason, result)
        .await;
    if found {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("player {id} is not online")))
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SanctionBody {
    /// How long, 1 second to 10 years.
    seconds: u64,
    #[serde(default)]
    reason: String,
}

#[derive(Serialize, ToSchema)]
struct SanctionReply {
    id: u64,
    /// Unix ms when it ends.
    until_ms: u64,
    reason: String,
}

/// Applies a mute or ban: checks the scope, then runs the change to the
/// end on its own task ([`AdminState::change`]).
async fn sanction(
    caller: Caller,
    state: AdminState,
    id: u64,
    kind: SanctionKind,
    body: SanctionBody,
) -> Result<axum::Json<SanctionReply>, ApiError> {
    caller.need(Need::Gm)?;
    let s = state.clone();
    s.change(async move { sanction_now(&caller, &state, id, kind, body).await })
        .await
}

/// Lifts a mute or ban, the same way as [`sanction`].
async fn lift(
    caller: Caller,
    state: AdminState,
    id: u64,
    kind: SanctionKind,
    body: ReasonBody,
) -> Result<StatusCode, ApiError> {
    caller.need(Need::Gm)?;
    let s = state.clone();
    s.change(async move { lift_now(&caller, &state, id, kind, body).await })
        .await
}

async fn sanction_now(
    caller: &Caller,
    state: &AdminState,
    id: u64,
    kind: SanctionKind,
    body: SanctionBody,
) -> Result<axum::Json<SanctionReply>, ApiError> {
    let reason = reason(&body.reason)?.to_owned();
    if body.seconds == 0 || body.seconds > MAX_SANCTION_SECS {
        return Err(ApiError::Unprocessable(format!(
            "seconds must be 1 to {MAX_SANCTION_SECS}"
        )));
    }
    if id == 0 {
        return Err(ApiError::BadRequest("user id 0 is no player".into()));
    }
    let now = now_ms();
    let sanction = crate::history::Sanction {
        user: id,
        kind,
        until_ms: now + body.seconds * 1000,
        reason: reason.clone(),
        set_ms: now,
    };
    // In a cluster the shared bucket comes first: once it has the
    // sanction every node applies it (and a node holding a banned
    // player's session kicks it).
    if let Some(cluster) = &state.cluster {
        cluster
            .put_sanction(&sanction)
            .await
            .map_err(|e| ApiError::Unavailable(format!("the cluster did not store it: {e}")))?;
    }
    if let Some(history) = &state.history {
        history
            .set_sanction(id, kind, sanction.until_ms, reason.clone())
            .await?;
    }
    state.moderation.apply(&sanction);
    let action = match kind {
        SanctionKind::Mute => "mute",
        SanctionKind::Ban => {
            // A banned player online is put out now; the ban refuses the
            // next login.
            state.world.kick(UserId(id), KickReason::KickBanned).await?;
            "ban"
        }
    };
    state
        .audit(
            &caller.id,
            action,
            format!("player:{id}"),
            &reason,
            &format!("seconds={}", body.seconds),
        )
        .await;
    Ok(axum::Json(SanctionReply {
        id,
        until_ms: sanction.until_ms,
        reason,
    }))
}

async fn lift_now(
    caller: &Caller,
    state: &AdminState,
    id: u64,
    kind: SanctionKind,
    body: ReasonBody,
) -> Result<StatusCode, ApiError> {
    let reason = reason(&body.reason)?;
    let shared = match &state.cluster {
        Some(cluster) => cluster
            .clear_sanction(UserId(id), kind)
            .await
            .map_err(|e| ApiError::Unavailable(format!("the cluster did not lift it: {e}")))?,
        None => false,
    };
    let stored = match &state.history {
        Some(history) => history.clear_sanction(id, kind).await?,
        None => false,
    };
    let cached = state.moderation.lift(UserId(id), kind);
    let action = match kind {
        SanctionKind::Mute => "unmute",
        SanctionKind::Ban => "unban",
    };
    let found = shared || stored || cached;
    state
        .audit(
            &caller.id,
            action,
            format!("player:{id}"),
            reason,
            if found { "ok" } else { "none" },
        )
        .await;
    if found {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!(
            "player {id} has no such sanction"
        )))
    }
}

/// Mutes a player: chat lines get RES_MUTED with the time left. Lasts
/// across logout, restart and takeover.
#[utoipa::path(put, path = "/v1/players/{id}/mute", tag = "gm",
    params(("id" = u64, Path, description = "user id")),
    request_body = SanctionBody,
    responses((status = 200, body = SanctionReply), (status = 422, body = ErrorBody)))]
async fn mute(
    caller: Caller,
    state: State,
    Path(id): Path<u64>,
    Json(body): Json<SanctionBody>,
) -> Result<axum::Json<SanctionReply>, ApiError> {
    sanction(caller, state.0, id, SanctionKind::Mute, body).await
}

/// Lifts a mute.
#[utoipa::path(delete, path = "/v1/players/{id}/mute", tag = "gm",
    params(("id" = u64, Path, description = "user id")),
    request_body(content = Option<ReasonBody>, description = "optional"),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn unmute(
    caller: Caller,
    state: State,
    Path(id): Path<u64>,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<StatusCode, ApiError> {
    lift(caller, state.0, id, SanctionKind::Mute, body).await
}

#[derive(Serialize, ToSchema)]
struct MutesReply {
    mutes: Vec<SanctionReply>,
}

/// Every mute in force.
#[utoipa::path(get, path = "/v1/mutes", tag = "gm",
    responses((status = 200, body = MutesReply)))]
async fn mutes(caller: Caller, state: State) -> Result<axum::Json<MutesReply>, ApiError> {
    caller.need(Need::Gm)?;
    let mutes = state
        .moderation
        .list(SanctionKind::Mute)
        .into_iter()
        .map(|(u, s)| SanctionReply {
            id: u.0,
            until_ms: s.until_ms,
            reason: s.reason,
        })
        .collect();
    Ok(axum::Json(MutesReply { mutes }))
}

/// Bans a player: logins get RES_BANNED with the time left; an online
/// player is kicked.
#[utoipa::path(put, path = "/v1/players/{id}/ban", tag = "gm",
    params(("id" = u64, Path, description = "user id")),
    request_body = SanctionBody,
    responses((status = 200, body = SanctionReply), (status = 422, body = ErrorBody)))]
async fn ban(
    caller: Caller,
    state: State,
    Path(id): Path<u64>,
    Json(body): Json<SanctionBody>,
) -> Result<axum::Json<SanctionReply>, ApiError> {
    sanction(caller, state.0, id, SanctionKind::Ban, body).await
}

/// Lifts a ban.
#[utoipa::path(delete, path = "/v1/players/{id}/ban", tag = "gm",
    params(("id" = u64, Path, description = "user id")),
    request_body(content = Option<ReasonBody>, description = "optional"),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn unban(
    caller: Caller,
    state: State,
    Path(id): Path<u64>,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<StatusCode, ApiError> {
    lift(caller, state.0, id, SanctionKind::Ban, body).await
}

#[derive(Serialize, ToSchema)]
struct RevokeReply {
    id: u64,
    /// Tokens issued (iat) before this Unix second are refused; mint the
    /// next one with `iat` at or after it.
    before_s: u64,
}

/// Refuses, from now on, every token of the player issued (`iat`) up to the
/// end of the current second. A session already logged in stays; its next
/// login needs a token issued after `before_s`.
#[utoipa::path(post, path = "/v1/players/{id}/revoke-tokens", tag = "gm",
    params(("id" = u64, Path, description = "user id")),
    request_body(content = Option<ReasonBody>, description = "optional"),
    responses((status = 200, body = RevokeReply)))]
async fn revoke(
    caller: Caller,
    state: State,
    Path(id): Path<u64>,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<axum::Json<RevokeReply>, ApiError> {
    caller.need(Need::Gm)?;
    let reason = reason(&body.reason)?;
    if id == 0 {
        return Err(ApiError::BadRequest("user id 0 is no player".into()));
    }
    // `iat` has second precision, so the revocation covers every token
    // issued up to the end of this second, this second's included.
    let mut before_s = now_ms() / 1000 + 1;
    // In a cluster the shared bucket comes first: once it has the
    // revocation every node applies it.
    if let Some(cluster) = &state.cluster {
        before_s = cluster
            .put_revocation(UserId(id), before_s)
            .await
            .map_err(|e| ApiError::Unavailable(format!("the cluster did not store it: {e}")))?;
    }
    let reason = reason.to_owned();
    let state = state.0.clone();
    let s = state.clone();
    s.change(async move {
        if let Some(history) = &state.history {
            history.revoke_tokens(id, before_s).await?;
        }
        state.moderation.revoke(UserId(id), before_s);
        state
            .audit(
                &caller.id,
                "revoke-tokens",
                format!("player:{id}"),
                &reason,
                "ok",
            )
            .await;
        Ok(())
    })
    .await?;
    Ok(axum::Json(RevokeReply { id, before_s }))
}

/// Removes a line from history; its audience online gets CHC_Notify_Recall.
#[utoipa::path(delete, path = "/v1/messages/{msg_id}", tag = "gm",
    params(("msg_id" = u64, Path, description = "the line's msg_id")),
    request_body(content = Option<ReasonBody>, description = "optional"),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn recall(
    caller: Caller,
    state: State,
    Path(msg_id): Path<u64>,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> Result<StatusCode, ApiError> {
    caller.need(Need::Gm)?;
    let reason = reason(&body.reason)?;
    let Some(history) = &state.history else {
        return Err(ApiError::NotFound(
            "no history is kept on this server".into(),
        ));
    };
    // A line a node sent alone while NATS was away has an id between the
    // stream's, which another node cut off at the same time may have
    // given a line of its own: such a line is recalled on the node that
    // sent it, and only there.
    let shared = state.cluster.as_ref().filter(|c| !c.between_lines(msg_id));
    // With one database for all nodes (`history.url`) the line is read
    // here and deleted only once every node has told its players, so that
    // a retry after a silent node still finds it and knows whom to tell.
    let one_database = shared.is_some() && history.lines_shared();
    let found = match one_database {
        true => history.find_shared_line(msg_id).await?,
        false => history.remove_message(msg_id).await?,
    };
    let target = format!("message:{msg_id}");
    let conversation = found.as_ref().map(|m| m.conversation);
    let mut reached = match found {
        Some(msg) => Some(state.world.recall(msg).await?),
        None => None,
    };
    // In a cluster every node keeps its own copy of every line, and its own
    // players to tell: each removes it, and the stream forgets it so that
    // no resume replays it. A node that does not answer is a 503 (a retry
    // finishes the job). With one database the call names the line's
    // conversation so that each node can tell its players.
    if let Some(cluster) = shared {
        let call = crate::cluster::calls::Call::Recall {
            msg_id,
            conversation: conversation.filter(|_| one_database),
        };
        let answers = match ask_every_node(&state, call, Stopped::Wait).await {
            Ok(answers) => answers,
            Err(e) => {
                // What was done is audited even so.
                let result = format!("partial: {e}");
                state
                    .audit(&caller.id, "recall", target.clone(), reason, &result)
                    .await;
                return Err(e);
            }
        };
        for answer in answers {
            if let crate::cluster::calls::Answered::Recalled(true, told) = answer {
                reached = Some(reached.unwrap_or(0) + told);
            }
        }
        if one_database && reached.is_some() {
            // Every node has told its players: now the line goes (with any
            // copy in this node's file).
            history.remove_message(msg_id).await?;
        }
        if let Err(e) = cluster.forget_line(msg_id).await {
            let e = ApiError::Unavailable(format!("the line stream did not forget it: {e}"));
            state
                .audit(
                    &caller.id,
                    "recall",
                    target,
                    reason,
                    &format!("partial: {e}"),
                )
                .await;
            return Err(e);
        }
    }
    match reached {
        Some(reached) => {
            state
                .audit(
                    &caller.id,
                    "recall",
                    target,
                    reason,
                    &format!("notified={reached}"),
                )
                .await;
            Ok(StatusCode::NO_CONTENT)
        }
        None => {
            state
                .audit(&caller.id, "recall", target, reason, "not_found")
                .await;
            Err(ApiError::NotFound(format!("no stored message {msg_id}")))
        }
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct MessagesQuery {
    /// Only lines sent at or after this Unix ms.
    #[serde(default)]
    since_ms: u64,
    /// At most this many (1 to 200, default 50).
    limit: Option<u32>,
}

#[derive(Serialize, ToSchema)]
struct MessageItem {
    msg_id: u64,
    /// The channel: `CHAT_WORLD`, `CHAT_GUILD`, ...
    channel: String,
    text: String,
    time_ms: u64,
    guild: u64,
    team: u64,
    scene: u64,
    target: u64,
}

#[derive(Serialize, ToSchema)]
struct MessagesReply {
    messages: Vec<MessageItem>,
}

fn item(m: StoredMsg) -> MessageItem {
    MessageItem {
        msg_id: m.msg_id,
        channel: guildchat_protocol::ChatType::try_from(m.chattype)
            .map_or_else(|_| m.chattype.to_string(), |c| c.as_str_name().to_owned()),
        text: m.text,
        time_ms: m.time_ms,
        guild: m.guild_id,
        team: m.team_id,
        scene: m.scene_id,
        target: m.target_id,
    }
}

/// What a player sent, newest first (stored lines only).
#[utoipa::path(get, path = "/v1/players/{id}/messages", tag = "gm",
    params(("id" = u64, Path, description = "user id"), MessagesQuery),
    responses((status = 200, body = MessagesReply)))]
async fn messages(
    caller: Caller,
    state: State,
    Path(id): Path<u64>,
    Query(q): Query<MessagesQuery>,
) -> Result<axum::Json<MessagesReply>, ApiError> {
    caller.need(Need::Gm)?;
    let limit = limit(q.limit)?;
    let messages = match &state.history {
        Some(h) => h.messages_by_sender(id, q.since_ms, limit).await?,
        None => Vec::new(),
    };
    Ok(axum::Json(MessagesReply {
        messages: messages.into_iter().map(item).collect(),
    }))
}

fn limit(l: Option<u32>) -> Result<u32, ApiError> {
    match l {
        None => Ok(50),
        Some(l) if (1..=MAX_LIMIT).contains(&l) => Ok(l),
        Some(_) => Err(ApiError::BadRequest(format!(
            "limit must be 1 to {MAX_LIMIT}"
        ))),
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct AuditQuery {
    /// Only entries with a smaller id (for the next page); 0 or absent:
    /// from the newest.
    #[serde(default)]
    before: u64,
    /// At most this many (1 to 200, default 50).
    limit: Option<u32>,
}

#[derive(Serialize, ToSchema)]
struct AuditReply {
    entries: Vec<AuditItem>,
}

#[derive(Serialize, ToSchema)]
struct AuditItem {
    id: u64,
    time_ms: u64,
    key_id: String,
    action: String,
    target: String,
    reason: String,
    result: String,
    /// In a cluster: the node whose admin API took the action.
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<String>,
}

impl From<(AuditEntry, Option<String>)> for AuditItem {
    fn from((e, node): (AuditEntry, Option<String>)) -> Self {
        AuditItem {
            node,
            id: e.id,
            time_ms: e.time_ms,
            key_id: e.key_id,
            action: e.action,
            target: e.target,
            reason: e.reason,
            result: e.result,
        }
    }
}

/// The audit log, newest first.
#[utoipa::path(get, path = "/v1/audit", tag = "gm",
    params(AuditQuery),
    responses((status = 200, body = AuditReply)))]
async fn audit(
    caller: Caller,
    state: State,
    Query(q): Query<AuditQuery>,
) -> Result<axum::Json<AuditReply>, ApiError> {
    caller.need(Need::Gm)?;
    let limit = limit(q.limit)?;
    let entries = state.audit_page(q.before, limit).await?;
    Ok(axum::Json(AuditReply {
        entries: entries.into_iter().map(AuditItem::from).collect(),
    }))
}

// ---------------------------------------------------------------- filter

#[derive(Serialize, ToSchema)]
struct WordsReply {
    words: Vec<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct WordsBody {
    words: Vec<String>,
}

/// The sensitive-word list.
#[utoipa::path(get, path = "/v1/filter/words", tag = "gm",
    responses((status = 200, body = WordsReply)))]
async fn words(caller: Caller, state: State) -> Result<axum::Json<WordsReply>, ApiError> {
    caller.need(Need::Gm)?;
    Ok(axum::Json(WordsReply {
        words: state.filter.words(),
    }))
}

async fn change_words(
    caller: &Caller,
    state: &AdminState,
    action: &str,
    change: crate::filter::Change,
) -> Result<axum::Json<WordsReply>, ApiError> {
    caller.need(Need::Gm)?;
    let dir = state.config.data_dir.clone();
    let filter = state.filter.clone();
    let refused = |e: crate::filter::FilterError| match e {
        crate::filter::FilterError::Read { .. } | crate::filter::FilterError::Write { .. } => {
            ApiError::Unavailable(e.to_string())
        }
        _ => ApiError::Unprocessable(e.to_string()),
    };
    let (count, words) = match &state.cluster {
        // In a cluster the shared list is the list: the edit goes there,
        // and this node's watch puts it in force (and in its file).
        Some(cluster) => {
            edit_shared_words(cluster, &state.filter, &dir, change)
                .await
                .map_err(|e| match e {
                    SharedEdit::Refused(e) => refused(e),
                    SharedEdit::Cluster(e) => {
                        ApiError::Unavailable(format!("the shared word list did not take it: {e}"))
                    }
                })?;
            let words = state.filter.words();
            (words.len(), words)
        }
        None => tokio::task::spawn_blocking(move || filter.change(&dir, change))
            .await
            .map_err(|_| ApiError::Unavailable("the filter update stopped".into()))?
            .map_err(refused)?,
    };
    state
        .audit(
            &caller.id,
            action,
            "filter".into(),
            "",
            &format!("words={count}"),
        )
        .await;
    Ok(axum::Json(WordsReply { words }))
}

enum SharedEdit {
    Refused(crate::filter::FilterError),
    Cluster(crate::cluster::ClusterError),
}

/// Writes an edit to the cluster's shared list as the words it adds and
/// the keys it deletes. An add only adds and a remove only removes, so an
/// edit made on another node a moment ago and not yet seen here is kept.
async fn edit_shared_words(
    cluster: &crate::cluster::Cluster,
    filter: &crate::filter::FilterHandle,
    dir: &std::path::Path,
    change: crate::filter::Change,
) -> Result<(), SharedEdit> {
    use crate::cluster::word_key;
    use crate::filter::{normalize_word, Change};
    let shared = cluster.word_keys().await.map_err(SharedEdit::Cluster)?;
    // The keys an add or a remove names (a replace names the whole list).
    let named: Option<std::collections::BTreeSet<String>> = match &change {
        Change::Add(words) | Change::Remove(words) => {
            Some(words.iter().map(|w| word_key(&normalize_word(w))).collect())
        }
        Change::Replace(_) => None,
    };
    let removing = matches!(change, Change::Remove(_));
    let list = filter.preview(dir, change).map_err(SharedEdit::Refused)?;
    let listed: std::collections::BTreeMap<String, &str> = list
        .normalized()
        .zip(list.words())
        .map(|(n, w)| (word_key(n), w))
        .collect();
    let new_words = |keep: &dyn Fn(&str) -> bool| -> Vec<(String, String)> {
        listed
            .iter()
            .filter(|(k, _)| !shared.contains(*k) && keep(k))
            .map(|(k, w)| (k.clone(), (*w).to_owned()))
            .collect()
    };
    let (puts, deletes) = match named {
        Some(named) if removing => (Vec::new(), shared.intersection(&named).cloned().collect()),
        Some(named) => (new_words(&|k| named.contains(k)), Vec::new()),
        None => (
            new_words(&|_| true),
            shared
                .iter()
                .filter(|k| !listed.contains_key(*k))
                .cloned()
                .collect(),
        ),
    };
    cluster
        .edit_words(puts, deletes)
        .await
        .map_err(SharedEdit::Cluster)
}

/// Replaces the whole list; applies at once and is kept in the data dir.
#[utoipa::path(put, path = "/v1/filter/words", tag = "gm",
    request_body = WordsBody,
    responses((status = 200, body = WordsReply), (status = 422, body = ErrorBody)))]
async fn replace_words(
    caller: Caller,
    state: State,
    Json(body): Json<WordsBody>,
) -> Result<axum::Json<WordsReply>, ApiError> {
    change_words(
        &caller,
        &state,
        "filter-replace",
        crate::filter::Change::Replace(body.words),
    )
    .await
}

/// Adds words to the list.
#[utoipa::path(post, path = "/v1/filter/words", tag = "gm",
    request_body = WordsBody,
    responses((status = 200, body = WordsReply), (status = 422, body = ErrorBody)))]
async fn add_words(
    caller: Caller,
    state: State,
    Json(body): Json<WordsBody>,
) -> Result<axum::Json<WordsReply>, ApiError> {
    change_words(
        &caller,
        &state,
        "filter-add",
        crate::filter::Change::Add(body.words),
    )
    .await
}

/// Removes words from the list.
#[utoipa::path(delete, path = "/v1/filter/words", tag = "gm",
    request_body = WordsBody,
    responses((status = 200, body = WordsReply), (status = 422, body = ErrorBody)))]
async fn remove_words(
    caller: Caller,
    state: State,
    Json(body): Json<WordsBody>,
) -> Result<axum::Json<WordsReply>, ApiError> {
    change_words(
        &caller,
        &state,
        "filter-remove",
        crate::filter::Change::Remove(body.words),
    )
    .await
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct FilterTestBody {
    text: String,
}

#[derive(Serialize, ToSchema)]
struct FilterTestReply {
    /// The text as players would see it.
    filtered: String,
    /// The list's words found in it.
    matches: Vec<String>,
}

/// Runs the filter on a text without sending anything.
#[utoipa::path(post, path = "/v1/filter/test", tag = "gm",
    request_body = FilterTestBody,
    responses((status = 200, body = FilterTestReply)))]
async fn filter_test(
    caller: Caller,
    state: State,
    Json(body): Json<FilterTestBody>,
) -> Result<axum::Json<FilterTestReply>, ApiError> {
    caller.need(Need::Gm)?;
    let (filtered, matches) = state.filter.test(&body.text);
    Ok(axum::Json(FilterTestReply { filtered, matches }))
}

// ---------------------------------------------------------------- reload

#[derive(Serialize, ToSchema)]
struct ReloadReply {
    /// What was re-read: `keys`, `tls`, `filter`.
    reloaded: Vec<&'static str>,
}

#[derive(Serialize, ToSchema)]
struct DrainReply {
    draining: bool,
    /// Sessions on this node when the drain began.
    players: u64,
}

/// Drains this node for a restart: it stops accepting connections
/// (`/readyz` answers 503), ends its sessions a batch at a time with
/// `KICK_RECONNECT` (clients reconnect at once and resume on another
/// node), and exits once none is left. Asking again changes nothing.
#[utoipa::path(post, path = "/v1/drain", tag = "gm",
    responses((status = 202, body = DrainReply), (status = 503, body = ErrorBody)))]
async fn drain(
    caller: Caller,
    state: State,
) -> Result<(StatusCode, axum::Json<DrainReply>), ApiError> {
    caller.need(Need::Gm)?;
    let Some(drain) = &state.drain else {
        return Err(ApiError::Unavailable("no server to drain".into()));
    };
    let (players, _) = state.world.counts().await?;
    if !drain.is_cancelled() {
        state
            .audit(&caller.id, "drain", "node".into(), "", "ok")
            .await;
        drain.cancel();
    }
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(DrainReply {
            draining: true,
            players,
        }),
    ))
}

/// Re-reads the key ring, the TLS certificate and the word list, and
/// applies them to new logins and connections. No session is dropped. A
/// reload that fails validation keeps everything as it was.
#[utoipa::path(post, path = "/v1/reload", tag = "gm",
    responses((status = 200, body = ReloadReply), (status = 422, body = ErrorBody)))]
async fn reload(caller: Caller, state: State) -> Result<axum::Json<ReloadReply>, ApiError> {
    caller.need(Need::Gm)?;
    let reloader = state.reloader.clone();
    let result = tokio::task::spawn_blocking(move || reloader.reload())
        .await
        .map_err(|_| ApiError::Unavailable("the reload stopped".into()))?;
    match result {
        Ok(reloaded) => {
            state
                .audit(&caller.id, "reload", "server".into(), "", "ok")
                .await;
            Ok(axum::Json(ReloadReply { reloaded }))
        }
        Err(e) => {
            state
                .audit(
                    &caller.id,
                    "reload",
                    "server".into(),
                    "",
                    &format!("refused: {e}"),
                )
                .await;
            Err(ApiError::Unprocessable(format!(
                "reload refused, nothing changed: {e}"
            )))
        }
    }
}
