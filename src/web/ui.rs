//! The HTML pages: the shell with its tabs, one fragment per section (fetched and re-rendered with
//! htmx), and the presets panel. Every rule is evaluated here on the server; the browser only posts
//! the form and swaps in what comes back.

use std::collections::HashMap;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Form;
use serde_json::Value;

use loft_worker::train::TrainConfig;

use super::clients::ClientsBox;
use super::{cookie, render, AppState};
use crate::drafts;
use crate::presets::{PresetError, PresetSummary, Presets};
use crate::registry::{fmt_num, Config, FieldError, FieldState, Kind, Registry};

const DRAFT_COOKIE: &str = "loft_draft";
pub const PRESETS_TAB: &str = "presets";
const NETWORK_TAB: &str = "network";

pub struct TabLink {
    pub id: String,
    pub title: String,
    pub active: bool,
    pub errors: usize,
}

pub struct ChoiceView {
    pub value: String,
    pub label: String,
    pub selected: bool,
}

/// A field ready for the template: every string pre-formatted.
pub struct FieldView {
    pub key: String,
    pub label: String,
    pub kind: &'static str,
    pub value: String,
    pub checked: bool,
    pub enabled: bool,
    pub help: String,
    pub min: String,
    pub max: String,
    pub step: String,
    pub bounds: String,
    pub choices: Vec<ChoiceView>,
    pub placeholder: String,
    pub required: bool,
    pub error: String,
    /// The only problem is an empty required value: shown as a quiet hint, not an alarm, so a
    /// fresh form does not greet a newcomer in red.
    pub missing: bool,
    /// Values offered in a datalist (the dataset and model pickers), with labels.
    pub suggestions: Vec<ChoiceView>,
}

pub struct GroupView {
    pub title: String,
    pub fields: Vec<FieldView>,
}

#[derive(Template)]
#[template(path = "page.html")]
pub struct PageTemplate {
    pub tabs: Vec<TabLink>,
    pub panel: String,
    /// The page's own tab bar is in place, not an out-of-band swap.
    pub oob: bool,
}

#[derive(Template)]
#[template(path = "section.html")]
pub struct SectionTemplate {
    pub id: String,
    pub title: String,
    pub intro: String,
    pub groups: Vec<GroupView>,
    /// The Network tab's client-compatibility box (HTML), empty elsewhere.
    pub clients: String,
    pub tabs: Vec<TabLink>,
    pub oob: bool,
}

pub struct ErrorLine {
    pub tab: String,
    pub tab_title: String,
    pub label: String,
    pub message: String,
}

#[derive(Template)]
#[template(path = "presets.html")]
pub struct PresetsTemplate {
    pub presets: Vec<PresetSummary>,
    pub message: String,
    pub problem: String,
    pub errors: Vec<ErrorLine>,
    pub name: String,
    pub tabs: Vec<TabLink>,
    pub oob: bool,
}

fn display_value(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.as_f64().map(fmt_num).unwrap_or_else(|| n.to_string()),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn field_view(state: FieldState) -> FieldView {
    let bounds = match (state.min, state.max) {
        (Some(lo), Some(hi)) => format!("{} – {}", fmt_num(lo), fmt_num(hi)),
        (Some(lo), None) => format!("≥ {}", fmt_num(lo)),
        (None, Some(hi)) => format!("≤ {}", fmt_num(hi)),
        (None, None) => String::new(),
    };
    let value = display_value(&state.value);
    let missing = state.required && value.trim().is_empty() && state.error.is_some();
    FieldView {
        missing,
        choices: state
            .choices
            .iter()
            .map(|c| ChoiceView { value: c.value.clone(), label: c.label.clone(), selected: c.value == value })
            .collect(),
        checked: state.value == Value::Bool(true),
        key: state.key,
        label: state.label,
        kind: state.kind.name(),
        value,
        enabled: state.enabled,
        help: state.help,
        min: state.min.map(fmt_num).unwrap_or_default(),
        max: state.max.map(fmt_num).unwrap_or_default(),
        step: state.step.map(fmt_num).unwrap_or_else(|| if state.kind == Kind::Float { "any".into() } else { String::new() }),
        bounds,
        placeholder: state.placeholder.unwrap_or_default(),
        required: state.required,
        error: state.error.unwrap_or_default(),
        suggestions: vec![],
    }
}

/// The tab bar, with the count of problems in each section.
fn tab_links(registry: &Registry, config: &Config, active: &str) -> Vec<TabLink> {
    let errors = registry.validate(config);
    let mut tabs: Vec<TabLink> = registry
        .sections
        .iter()
        .map(|s| TabLink {
            id: s.meta.id.clone(),
            title: s.meta.title.clone(),
            active: s.meta.id == active,
            errors: errors
                .iter()
                .filter(|e| registry.field(&e.field).is_some_and(|f| f.section == s.meta.id))
                .count(),
        })
        .collect();
    tabs.push(TabLink { id: PRESETS_TAB.into(), title: "Presets".into(), active: active == PRESETS_TAB, errors: 0 });
    tabs
}

fn section_template(registry: &Registry, id: &str, config: &Config, oob: bool) -> Option<SectionTemplate> {
    let section = registry.section(id)?;
    let mut groups: Vec<GroupView> = Vec::new();
    for state in registry.evaluate_section(section, config) {
        if !state.visible {
            continue;
        }
        let title = state.group.clone().unwrap_or_default();
        match groups.last_mut() {
            Some(g) if g.title == title => g.fields.push(field_view(state)),
            _ => groups.push(GroupView { title, fields: vec![field_view(state)] }),
        }
    }
    let clients = if section.meta.id == NETWORK_TAB { network_clients_html(registry, config) } else { String::new() };
    Some(SectionTemplate {
        clients,
        id: section.meta.id.clone(),
        title: section.meta.title.clone(),
        intro: section.meta.intro.clone(),
        groups,
        tabs: tab_links(registry, config, id),
        oob,
    })
}

/// How ComfyUI, A1111/Forge and diffusers will load what the draft trains (empty while the
/// draft's values cannot be read, e.g. a number field holding text).
fn network_clients_html(registry: &Registry, config: &Config) -> String {
    let mut config = config.clone();
    registry.apply_links(&mut config, &[]);
    let active = crate::jobs::config::active_config(registry, &registry.resolve(&config));
    match TrainConfig::read_fields(&active) {
        Ok(train) => {
            let (verdicts, convert) = train.client_verdicts();
            ClientsBox::new(&verdicts, convert).render().unwrap_or_default()
        }
        Err(_) => String::new(),
    }
}

fn presets_template(state: &AppState, config: &Config, message: String, problem: String, errors: &[FieldError], name: String, oob: bool) -> PresetsTemplate {
    let registry = &state.registry;
    let presets = Presets { db: &state.db, registry }.list().unwrap_or_default();
    let errors = errors
        .iter()
        .map(|e| {
            let field = registry.field(&e.field);
            let tab = field.map(|f| f.section.clone()).unwrap_or_default();
            ErrorLine {
                tab_title: registry.section(&tab).map(|s| s.meta.title.clone()).unwrap_or_default(),
                tab,
                label: field.map(|f| f.label.clone()).unwrap_or_else(|| e.field.clone()),
                message: e.message.clone(),
            }
        })
        .collect();
    PresetsTemplate { presets, message, problem, errors, name, tabs: tab_links(registry, config, PRESETS_TAB), oob }
}

/// The browser's draft id, from its cookie, and whether the cookie must be set.
pub(super) fn draft_id(headers: &HeaderMap) -> (String, bool) {
    match cookie(headers, DRAFT_COOKIE).filter(|v| v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit())) {
        Some(id) => (id.to_string(), false),
        None => (drafts::new_id(), true),
    }
}

/// Merges the open section's form fields (`_section` names it) into `config`; true when there
/// were any.
pub(super) fn merge_open_section(state: &AppState, config: &mut Config, pairs: Vec<(String, String)>) -> bool {
    let section = pairs.iter().find(|(k, _)| k == "_section").map(|(_, v)| v.clone()).unwrap_or_default();
    let pairs: Vec<(String, String)> = pairs.into_iter().filter(|(k, _)| state.registry.field(k).is_some_and(|f| f.section == section)).collect();
    if pairs.is_empty() {
        return false;
    }
    state.registry.merge_form(config, &pairs);
    true
}

pub(super) fn with_cookie(mut response: Response, id: &str, set: bool) -> Response {
    if set {
        let value = format!("{DRAFT_COOKIE}={id}; Path=/; HttpOnly; SameSite=Lax; Max-Age=31536000");
        response.headers_mut().append(header::SET_COOKIE, HeaderValue::from_str(&value).expect("hex cookie"));
    }
    response
}

/// One tab's HTML (`None` for an unknown tab). `oob` adds the refreshed tab bar for htmx swaps.
fn tab_html(state: &AppState, id: &str, config: &Config, oob: bool) -> Option<Result<String, askama::Error>> {
    if id == PRESETS_TAB {
        return Some(presets_template(state, config, String::new(), String::new(), &[], String::new(), oob).render());
    }
    section_template(&state.registry, id, config, oob).map(|mut t| {
        add_pickers(state, &mut t);
        t.render()
    })
}

/// The pickers: the datasets for the data folders, the base models under the allowed roots for
/// the model path (offered as a datalist: any path can still be typed).
fn add_pickers(state: &AppState, t: &mut SectionTemplate) {
    for f in t.groups.iter_mut().flat_map(|g| g.fields.iter_mut()) {
        let options: Vec<(String, String)> = match f.key.as_str() {
            "train_data_dir" | "reg_data_dir" => state
                .datasets
                .list()
                .unwrap_or_default()
                .into_iter()
                .map(|d| (state.datasets.root.join(&d.name).display().to_string(), format!("dataset {} ({} images)", d.name, d.images)))
                .collect(),
            "pretrained_model_name_or_path" => state.datasets.model_candidates(),
            _ => continue,
        };
        f.suggestions = options.into_iter().map(|(value, label)| ChoiceView { selected: value == f.value, value, label }).collect();
    }
}

fn render_tab(state: &AppState, id: &str, config: &Config, oob: bool) -> Response {
    match tab_html(state, id, config, oob) {
        Some(Ok(html)) => axum::response::Html(html).into_response(),
        Some(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("template error: {e}")).into_response(),
        None => (StatusCode::NOT_FOUND, format!("no tab '{id}'")).into_response(),
    }
}

/// `GET /`: the page shell with the requested tab (`?tab=`) rendered in place, so the first paint
/// is complete and styled.
pub async fn page(State(state): State<AppState>, headers: HeaderMap, Query(q): Query<HashMap<String, String>>) -> Response {
    let (id, set) = draft_id(&headers);
    let config = drafts::load(&state.db, &id);
    let first = state.registry.sections[0].meta.id.clone();
    let requested = q.get("tab").cloned().unwrap_or_default();
    let tab = if requested == PRESETS_TAB || state.registry.section(&requested).is_some() { requested } else { first };
    let panel = match tab_html(&state, &tab, &config, false) {
        Some(Ok(html)) => html,
        Some(Err(e)) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("template error: {e}")).into_response(),
        None => return (StatusCode::NOT_FOUND, format!("no tab '{tab}'")).into_response(),
    };
    let page = PageTemplate { tabs: tab_links(&state.registry, &config, &tab), panel, oob: false };
    with_cookie(render(&page), &id, set)
}

/// `GET /ui/tab/{id}`: one tab's fragment, from the draft.
pub async fn tab(State(state): State<AppState>, headers: HeaderMap, Path(tab): Path<String>) -> Response {
    let (id, set) = draft_id(&headers);
    let config = drafts::load(&state.db, &id);
    with_cookie(render_tab(&state, &tab, &config, true), &id, set)
}

/// `POST /ui/tab/{id}`: a section's form changed, or the user switched to tab `id` (the tab button
/// posts the open section's form along, so nothing typed is lost even before a change event).
/// The posted fields of section `_section` are merged into the draft (values that do not parse are
/// kept, to be shown with their error), links applied, the draft stored, and tab `id` rendered.
pub async fn update_tab(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(tab): Path<String>,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let registry = &state.registry;
    if tab != PRESETS_TAB && registry.section(&tab).is_none() {
        return (StatusCode::NOT_FOUND, format!("no tab '{tab}'")).into_response();
    }
    let (id, set) = draft_id(&headers);
    let mut config = drafts::load(&state.db, &id);
    let posted_section = pairs.iter().find(|(k, _)| k == "_section").map(|(_, v)| v.clone()).unwrap_or_else(|| tab.clone());
    // Only the posted section's fields are taken: a form cannot change another tab.
    let pairs: Vec<(String, String)> =
        pairs.into_iter().filter(|(k, _)| registry.field(k).is_some_and(|f| f.section == posted_section)).collect();
    if !pairs.is_empty() {
        registry.merge_form(&mut config, &pairs);
        if let Err(e) = drafts::store(&state.db, &id, &config) {
            return (StatusCode::INTERNAL_SERVER_ERROR, format!("could not store the draft: {e}")).into_response();
        }
    }
    with_cookie(render_tab(&state, &tab, &config, true), &id, set)
}

/// `POST /ui/draft/reset`: back to the defaults.
pub async fn reset_draft(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let (id, set) = draft_id(&headers);
    let config = Config::new();
    if let Err(e) = drafts::store(&state.db, &id, &config) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("could not reset the draft: {e}")).into_response();
    }
    let first = state.registry.sections[0].meta.id.clone();
    with_cookie(render_tab(&state, &first, &config, true), &id, set)
}

/// `POST /ui/presets` (form field `name`): save the draft as a preset, after validation.
pub async fn save_preset(State(state): State<AppState>, headers: HeaderMap, Form(form): Form<HashMap<String, String>>) -> Response {
    let (id, set) = draft_id(&headers);
    let config = drafts::load(&state.db, &id);
    let name = form.get("name").cloned().unwrap_or_default();
    let presets = Presets { db: &state.db, registry: &state.registry };
    let page = match presets.create(&name, &config, "") {
        Ok(saved) => presets_template(&state, &config, format!("Saved preset '{saved}'."), String::new(), &[], String::new(), true),
        Err(PresetError::Invalid(errors)) => presets_template(
            &state,
            &config,
            String::new(),
            format!("Not saved: {} value(s) need fixing first.", errors.len()),
            &errors,
            name,
            true,
        ),
        Err(e) => presets_template(&state, &config, String::new(), format!("Not saved: {e}."), &[], name, true),
    };
    with_cookie(render(&page), &id, set)
}

/// `POST /ui/presets/{name}/{load|duplicate|rename|delete}`.
pub async fn preset_action(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let (id, set) = draft_id(&headers);
    let mut config = drafts::load(&state.db, &id);
    let presets = Presets { db: &state.db, registry: &state.registry };
    let outcome = match action.as_str() {
        "load" => presets.get(&name).map(|p| {
            config = state.registry.sparsify(&p.config);
            let _ = drafts::store(&state.db, &id, &config);
            format!("Loaded preset '{name}' into the form.")
        }),
        "duplicate" => presets.duplicate(&name).map(|n| format!("Duplicated '{name}' as '{n}'.")),
        "rename" => {
            let to = form.get("new_name").cloned().unwrap_or_default();
            presets.rename(&name, &to).map(|n| format!("Renamed '{name}' to '{n}'."))
        }
        "delete" => presets.delete(&name).map(|_| format!("Deleted preset '{name}'.")),
        other => return (StatusCode::NOT_FOUND, format!("no preset action '{other}'")).into_response(),
    };
    let page = match outcome {
        Ok(message) => presets_template(&state, &config, message, String::new(), &[], String::new(), true),
        Err(e) => presets_template(&state, &config, String::new(), format!("{e}."), &[], String::new(), true),
    };
    with_cookie(render(&page), &id, set)
}
