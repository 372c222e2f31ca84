//! The field registry: every training option as data, loaded from `fields/*.toml` (embedded in the
//! binary), and the one evaluation of its rules that the form, the JSON API, the validator, presets
//! and the docs all share.
//!
//! A configuration is a map from field key to a JSON value. Rules are evaluated against the
//! *resolved* configuration: what the user set, and for everything else the default for the chosen
//! model family (see `overrides.<family>` in a field file).

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use anyhow::{bail, Context, Result};
use include_dir::{include_dir, Dir};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

static FIELD_FILES: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/fields");

/// The key of the field that selects the model family; overrides are keyed by its values.
pub const MODEL_FAMILY: &str = "model_family";

/// A configuration: field key → value. Sparse (only what the user set) or resolved (every key).
pub type Config = Map<String, Value>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Toggle,
    Integer,
    Float,
    Text,
    Choice,
    Path,
    Multiline,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Toggle => "toggle",
            Kind::Integer => "integer",
            Kind::Float => "float",
            Kind::Text => "text",
            Kind::Choice => "choice",
            Kind::Path => "path",
            Kind::Multiline => "multiline",
        }
    }
    fn is_number(self) -> bool {
        matches!(self, Kind::Integer | Kind::Float)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Choice {
    pub value: String,
    pub label: String,
}

/// Where a field goes when a configuration is exported for sd-scripts.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Export {
    /// sd-scripts command-line argument / config.toml key.
    pub arg: Option<String>,
    /// LyCORIS / kohya `network_args` entry.
    pub network_arg: Option<String>,
    /// sd-scripts dataset_config key.
    pub dataset: Option<String>,
    /// `key=value` inside sd-scripts' `--optimizer_args`.
    pub optimizer_arg: Option<String>,
}

/// `{ key = [values…] }`: true when every listed key currently has one of its values.
pub type Condition = BTreeMap<String, Vec<Value>>;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    pub default: Option<Value>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub disabled: Option<bool>,
    pub hidden: Option<bool>,
    /// Restricts the choices to this subset for the family.
    pub choices: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    pub key: String,
    pub label: String,
    pub kind: Kind,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub order: i64,
    pub default: Value,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub step: Option<f64>,
    pub help: String,
    #[serde(default)]
    pub export: Option<Export>,
    #[serde(default)]
    pub show_when: Option<Condition>,
    #[serde(default)]
    pub disable_when: Option<Condition>,
    #[serde(default)]
    pub enable_when: Option<Condition>,
    #[serde(default)]
    pub implies: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    pub overrides: BTreeMap<String, Override>,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub choices: Vec<Choice>,
    #[serde(default)]
    pub placeholder: Option<String>,
    /// The section (tab) id this field lives in; set from the file it was read from.
    #[serde(skip_deserializing)]
    pub section: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SectionMeta {
    pub id: String,
    pub title: String,
    pub order: i64,
    #[serde(default)]
    pub intro: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum CheckOp {
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = ">")]
    Gt,
}

impl CheckOp {
    fn holds(self, left: f64, right: f64) -> bool {
        match self {
            CheckOp::Le => left <= right,
            CheckOp::Lt => left < right,
            CheckOp::Ge => left >= right,
            CheckOp::Gt => left > right,
        }
    }
    fn symbol(self) -> &'static str {
        match self {
            CheckOp::Le => "≤",
            CheckOp::Lt => "<",
            CheckOp::Ge => "≥",
            CheckOp::Gt => ">",
        }
    }
}

/// A cross-field rule, e.g. min bucket resolution ≤ max bucket resolution.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub left: String,
    pub op: CheckOp,
    pub right: String,
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SectionFile {
    section: SectionMeta,
    #[serde(default)]
    field: Vec<Field>,
    #[serde(default)]
    check: Vec<Check>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Section {
    pub meta: SectionMeta,
    /// Keys of this section's fields, in display order.
    pub keys: Vec<String>,
}

/// One validation problem, attached to a field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A field with its rules applied to one configuration: what the form and `GET /api/fields` show.
#[derive(Debug, Clone, Serialize)]
pub struct FieldState {
    pub key: String,
    pub label: String,
    pub kind: Kind,
    pub section: String,
    pub group: Option<String>,
    pub value: Value,
    pub default: Value,
    pub visible: bool,
    pub enabled: bool,
    pub help: String,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub step: Option<f64>,
    pub choices: Vec<Choice>,
    pub required: bool,
    pub placeholder: Option<String>,
    pub error: Option<String>,
}

pub struct Registry {
    pub sections: Vec<Section>,
    fields: Vec<Field>,
    index: HashMap<String, usize>,
    pub checks: Vec<Check>,
}

impl Registry {
    /// The registry embedded in the binary.
    pub fn embedded() -> Result<Registry> {
        let mut files: Vec<(String, String)> = FIELD_FILES
            .files()
            .filter(|f| f.path().extension().is_some_and(|e| e == "toml"))
            .map(|f| {
                let name = f.path().to_string_lossy().into_owned();
                let text = f.contents_utf8().unwrap_or_default().to_string();
                (name, text)
            })
            .collect();
        files.sort();
        Registry::from_files(&files)
    }

    /// Builds a registry from `(file name, TOML text)` pairs and lints it.
    pub fn from_files(files: &[(String, String)]) -> Result<Registry> {
        let mut sections = Vec::new();
        let mut fields: Vec<Field> = Vec::new();
        let mut checks = Vec::new();
        for (name, text) in files {
            let parsed: SectionFile =
                toml::from_str(text).with_context(|| format!("fields/{name} is not a valid section file"))?;
            let stem = name.trim_end_matches(".toml");
            if parsed.section.id != stem {
                bail!("fields/{name}: section id `{}` must equal the file name", parsed.section.id);
            }
            let mut section_fields = parsed.field;
            for f in &mut section_fields {
                f.section = parsed.section.id.clone();
            }
            // Display order: by group (in order of first appearance), then entry fields before
            // toggles, then the declared order.
            let mut group_rank: HashMap<Option<String>, usize> = HashMap::new();
            for f in &section_fields {
                let n = group_rank.len();
                group_rank.entry(f.group.clone()).or_insert(n);
            }
            section_fields.sort_by_key(|f| (group_rank[&f.group], f.kind == Kind::Toggle, f.order));
            sections.push(Section {
                keys: section_fields.iter().map(|f| f.key.clone()).collect(),
                meta: parsed.section,
            });
            fields.extend(section_fields);
            checks.extend(parsed.check);
        }
        sections.sort_by_key(|s| s.meta.order);
        let mut index = HashMap::new();
        for (i, f) in fields.iter().enumerate() {
            if index.insert(f.key.clone(), i).is_some() {
                bail!("field `{}` is declared twice", f.key);
            }
        }
        let registry = Registry { sections, fields, index, checks };
        let problems = registry.lint();
        if !problems.is_empty() {
            bail!("the field registry has problems:\n  {}", problems.join("\n  "));
        }
        Ok(registry)
    }

    pub fn field(&self, key: &str) -> Option<&Field> {
        self.index.get(key).map(|&i| &self.fields[i])
    }

    pub fn fields(&self) -> impl Iterator<Item = &Field> {
        self.fields.iter()
    }

    pub fn section(&self, id: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.meta.id == id)
    }

    pub fn section_fields<'a>(&'a self, section: &'a Section) -> impl Iterator<Item = &'a Field> + 'a {
        section.keys.iter().map(|k| self.field(k).expect("section keys come from the registry"))
    }

    /// Every problem with the registry itself: rules naming unknown fields or values, defaults out
    /// of bounds, missing help text. Empty when the registry is well-formed.
    pub fn lint(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.field(MODEL_FAMILY).is_none() {
            problems.push(format!("there is no `{MODEL_FAMILY}` field"));
        }
        let families: Vec<String> = self
            .field(MODEL_FAMILY)
            .map(|f| f.choices.iter().map(|c| c.value.clone()).collect())
            .unwrap_or_default();
        for f in &self.fields {
            let at = format!("field `{}` ({})", f.key, f.section);
            if f.help.trim().len() < 10 {
                problems.push(format!("{at}: help text is missing or too short"));
            }
            if f.label.trim().is_empty() {
                problems.push(format!("{at}: label is empty"));
            }
            if f.kind == Kind::Choice && f.choices.is_empty() {
                problems.push(format!("{at}: a choice field needs choices"));
            }
            if f.kind != Kind::Choice && !f.choices.is_empty() {
                problems.push(format!("{at}: only choice fields have choices"));
            }
            if !f.kind.is_number() && (f.min.is_some() || f.max.is_some() || f.step.is_some()) {
                problems.push(format!("{at}: only numbers have min/max/step"));
            }
            if let (Some(lo), Some(hi)) = (f.min, f.max) {
                if lo > hi {
                    problems.push(format!("{at}: min {lo} is above max {hi}"));
                }
            }
            if let Err(e) = check_value(f, &f.default, f.min, f.max) {
                problems.push(format!("{at}: default {}: {e}", f.default));
            }
            for (family, o) in &f.overrides {
                if !families.contains(family) {
                    problems.push(format!("{at}: override for unknown model family `{family}`"));
                }
                let (lo, hi) = (o.min.or(f.min), o.max.or(f.max));
                let default = o.default.as_ref().unwrap_or(&f.default);
                if let Err(e) = check_value(f, default, lo, hi) {
                    problems.push(format!("{at}: {family} default {default}: {e}"));
                }
                for c in o.choices.iter().flatten() {
                    if !f.choices.iter().any(|x| &x.value == c) {
                        problems.push(format!("{at}: {family} override names unknown choice `{c}`"));
                    }
                }
            }
            for (rule, cond) in [("show_when", &f.show_when), ("disable_when", &f.disable_when), ("enable_when", &f.enable_when)] {
                for (key, values) in cond.iter().flatten() {
                    self.lint_reference(&at, rule, key, values, &mut problems);
                }
            }
            if let Some(implies) = &f.implies {
                if f.kind != Kind::Toggle {
                    problems.push(format!("{at}: only toggles can imply other fields"));
                }
                for (key, value) in implies {
                    self.lint_reference(&at, "implies", key, std::slice::from_ref(value), &mut problems);
                }
            }
        }
        for c in &self.checks {
            for key in [&c.left, &c.right] {
                match self.field(key) {
                    None => problems.push(format!("check `{}`: unknown field `{key}`", c.message)),
                    Some(f) if !f.kind.is_number() => {
                        problems.push(format!("check `{}`: `{key}` is not a number", c.message))
                    }
                    _ => {}
                }
            }
        }
        problems
    }

    fn lint_reference(&self, at: &str, rule: &str, key: &str, values: &[Value], problems: &mut Vec<String>) {
        let Some(target) = self.field(key) else {
            problems.push(format!("{at}: {rule} names unknown field `{key}`"));
            return;
        };
        if values.is_empty() {
            problems.push(format!("{at}: {rule} lists no values for `{key}`"));
        }
        for v in values {
            if let Err(e) = check_value(target, v, None, None) {
                problems.push(format!("{at}: {rule} value {v} is not a value of `{key}`: {e}"));
            }
        }
    }

    /// The model family a configuration selects (its value, or the field's default).
    pub fn family(&self, config: &Config) -> String {
        config
            .get(MODEL_FAMILY)
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| self.field(MODEL_FAMILY).and_then(|f| f.default.as_str().map(str::to_string)))
            .unwrap_or_default()
    }

    fn override_for<'a>(&self, field: &'a Field, family: &str) -> Option<&'a Override> {
        field.overrides.get(family)
    }

    /// The default of `field` for a model family.
    pub fn default_for(&self, field: &Field, family: &str) -> Value {
        self.override_for(field, family)
            .and_then(|o| o.default.clone())
            .unwrap_or_else(|| field.default.clone())
    }

    fn bounds_for(&self, field: &Field, family: &str) -> (Option<f64>, Option<f64>) {
        let o = self.override_for(field, family);
        (o.and_then(|o| o.min).or(field.min), o.and_then(|o| o.max).or(field.max))
    }

    fn choices_for(&self, field: &Field, family: &str) -> Vec<Choice> {
        match self.override_for(field, family).and_then(|o| o.choices.as_ref()) {
            Some(allowed) => field.choices.iter().filter(|c| allowed.contains(&c.value)).cloned().collect(),
            None => field.choices.clone(),
        }
    }

    /// Every key with a value: the user's where set, the family default otherwise. Keys the registry
    /// does not know are dropped.
    pub fn resolve(&self, config: &Config) -> Config {
        let family = self.family(config);
        let mut resolved = Config::new();
        for f in &self.fields {
            let v = config.get(&f.key).cloned().unwrap_or_else(|| self.default_for(f, &family));
            resolved.insert(f.key.clone(), v);
        }
        resolved
    }

    /// Removes values equal to their family default, so that defaults follow a change of family.
    pub fn sparsify(&self, config: &Config) -> Config {
        let family = self.family(config);
        config
            .iter()
            .filter(|(k, v)| match self.field(k) {
                Some(f) => k.as_str() == MODEL_FAMILY || !values_equal(v, &self.default_for(f, &family)),
                None => false,
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn condition_holds(&self, cond: &Condition, resolved: &Config) -> bool {
        cond.iter().all(|(key, values)| {
            let current = resolved.get(key).unwrap_or(&Value::Null);
            values.iter().any(|v| values_equal(current, v))
        })
    }

    /// Whether a field is shown for this (resolved) configuration.
    pub fn is_visible(&self, field: &Field, resolved: &Config) -> bool {
        let family = self.family(resolved);
        if self.override_for(field, &family).and_then(|o| o.hidden).unwrap_or(false) {
            return false;
        }
        field.show_when.as_ref().is_none_or(|c| self.condition_holds(c, resolved))
    }

    /// Whether a shown field is editable (not greyed) for this (resolved) configuration.
    pub fn is_enabled(&self, field: &Field, resolved: &Config) -> bool {
        let family = self.family(resolved);
        if self.override_for(field, &family).and_then(|o| o.disabled).unwrap_or(false) {
            return false;
        }
        if field.disable_when.as_ref().is_some_and(|c| self.condition_holds(c, resolved)) {
            return false;
        }
        field.enable_when.as_ref().is_none_or(|c| self.condition_holds(c, resolved))
    }

    /// A field takes part in training and export: shown and not greyed.
    pub fn is_active(&self, field: &Field, resolved: &Config) -> bool {
        self.is_visible(field, resolved) && self.is_enabled(field, resolved)
    }

    /// Applies the linked toggles. `changed` is the key the user just changed, if known: turning a
    /// toggle on turns on what it implies; turning an implied toggle off turns off what implied it.
    pub fn apply_links(&self, config: &mut Config, changed: &[String]) {
        let resolved = self.resolve(config);
        for key in changed {
            if resolved.get(key) == Some(&Value::Bool(false)) {
                for f in &self.fields {
                    let implies_key = f.implies.as_ref().is_some_and(|m| m.contains_key(key.as_str()));
                    if implies_key && resolved.get(&f.key) == Some(&Value::Bool(true)) {
                        config.insert(f.key.clone(), Value::Bool(false));
                    }
                }
            }
        }
        let resolved = self.resolve(config);
        for f in &self.fields {
            if let Some(implies) = &f.implies {
                if resolved.get(&f.key) == Some(&Value::Bool(true)) {
                    for (k, v) in implies {
                        config.insert(k.clone(), v.clone());
                    }
                }
            }
        }
    }

    /// Validates a configuration (sparse or resolved). Unknown keys, values of the wrong type, out
    /// of bounds or not among the choices, and failed cross-field checks each give one message.
    /// Values of hidden or greyed fields are still type-checked but not bound-checked: they are
    /// kept, not used.
    pub fn validate(&self, config: &Config) -> Vec<FieldError> {
        let mut errors = Vec::new();
        for key in config.keys() {
            if self.field(key).is_none() {
                errors.push(FieldError { field: key.clone(), message: "unknown field: Loft has no option with this key".into() });
            }
        }
        let resolved = self.resolve(config);
        let family = self.family(&resolved);
        for f in &self.fields {
            let value = &resolved[&f.key];
            let active = self.is_active(f, &resolved);
            let (lo, hi) = if active { self.bounds_for(f, &family) } else { (None, None) };
            let result = if f.kind == Kind::Choice && active {
                let allowed = self.choices_for(f, &family);
                check_choice(&allowed, value)
            } else {
                check_value(f, value, lo, hi)
            };
            if let Err(message) = result {
                errors.push(FieldError { field: f.key.clone(), message });
            } else if active && f.required && value.as_str().is_some_and(|s| s.trim().is_empty()) {
                errors.push(FieldError { field: f.key.clone(), message: format!("{} is required", f.label) });
            }
        }
        for c in &self.checks {
            let (Some(lf), Some(rf)) = (self.field(&c.left), self.field(&c.right)) else { continue };
            if !self.is_active(lf, &resolved) || !self.is_active(rf, &resolved) {
                continue;
            }
            let (Some(l), Some(r)) = (resolved[&c.left].as_f64(), resolved[&c.right].as_f64()) else { continue };
            if !c.op.holds(l, r) && !errors.iter().any(|e| e.field == c.left) {
                errors.push(FieldError {
                    field: c.left.clone(),
                    message: format!("{} (needs {} {} {}: {} {} {})", c.message, lf.label, c.op.symbol(), rf.label, l, c.op.symbol(), r),
                });
            }
        }
        errors
    }

    /// A section's fields with the rules applied to `config`, and the errors attached.
    pub fn evaluate_section(&self, section: &Section, config: &Config) -> Vec<FieldState> {
        let resolved = self.resolve(config);
        let family = self.family(&resolved);
        let errors = self.validate(config);
        self.section_fields(section)
            .map(|f| {
                let (min, max) = self.bounds_for(f, &family);
                FieldState {
                    key: f.key.clone(),
                    label: f.label.clone(),
                    kind: f.kind,
                    section: f.section.clone(),
                    group: f.group.clone(),
                    value: resolved[&f.key].clone(),
                    default: self.default_for(f, &family),
                    visible: self.is_visible(f, &resolved),
                    enabled: self.is_enabled(f, &resolved),
                    help: f.help.clone(),
                    min,
                    max,
                    step: f.step,
                    choices: self.choices_for(f, &family),
                    required: f.required,
                    placeholder: f.placeholder.clone(),
                    error: errors.iter().find(|e| e.field == f.key).map(|e| e.message.clone()),
                }
            })
            .collect()
    }

    /// Parses a value typed into a form (always a string) into the field's JSON type. A value that
    /// does not parse is kept as the raw string, so the form can show it back with its error.
    pub fn parse_input(&self, field: &Field, raw: &str) -> Value {
        let text = raw.trim();
        match field.kind {
            Kind::Toggle => match text {
                "true" | "on" | "1" | "yes" => Value::Bool(true),
                "false" | "off" | "0" | "no" | "" => Value::Bool(false),
                _ => Value::String(raw.to_string()),
            },
            Kind::Integer => text.parse::<i64>().map(Value::from).unwrap_or_else(|_| Value::String(raw.to_string())),
            Kind::Float => text
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .unwrap_or_else(|| Value::String(raw.to_string())),
            Kind::Choice | Kind::Text | Kind::Path | Kind::Multiline => Value::String(raw.replace("\r\n", "\n")),
        }
    }

    /// Merges posted form pairs into a sparse config. Later pairs win (a checkbox posts a hidden
    /// "false" before its "true"). Unknown keys are ignored: forms post only registry fields.
    /// The keys whose value changed drive the linked toggles.
    pub fn merge_form(&self, config: &mut Config, pairs: &[(String, String)]) {
        let before = self.resolve(config);
        let mut posted = Config::new();
        for (key, raw) in pairs {
            if let Some(field) = self.field(key) {
                posted.insert(key.clone(), self.parse_input(field, raw));
            }
        }
        let changed: Vec<String> =
            posted.iter().filter(|(k, v)| !before.get(*k).is_some_and(|b| values_equal(b, v))).map(|(k, _)| k.clone()).collect();
        config.extend(posted);
        self.apply_links(config, &changed);
        *config = self.sparsify(config);
    }

    /// Markdown options reference: every section and field, from the registry.
    pub fn markdown(&self) -> String {
        let mut out = String::from("# Loft options reference\n\nGenerated from `fields/*.toml` by `loft fields`.\n");
        for s in &self.sections {
            out.push_str(&format!("\n## {}\n\n", s.meta.title));
            if !s.meta.intro.is_empty() {
                out.push_str(&format!("{}\n\n", s.meta.intro));
            }
            out.push_str("| key | label | kind | default | bounds / choices | sd-scripts name | applies when | help |\n|---|---|---|---|---|---|---|---|\n");
            for f in self.section_fields(s) {
                let bounds = if f.kind == Kind::Choice {
                    f.choices.iter().map(|c| format!("`{}`", c.value)).collect::<Vec<_>>().join(", ")
                } else {
                    match (f.min, f.max) {
                        (None, None) => String::new(),
                        (lo, hi) => format!(
                            "{} … {}{}",
                            lo.map(fmt_num).unwrap_or_else(|| "−∞".into()),
                            hi.map(fmt_num).unwrap_or_else(|| "∞".into()),
                            f.step.map(|s| format!(", step {}", fmt_num(s))).unwrap_or_default()
                        ),
                    }
                };
                let export = f
                    .export
                    .as_ref()
                    .map(|e| {
                        [e.arg.as_ref().map(|a| format!("`--{a}`")), e.network_arg.as_ref().map(|a| format!("network_args `{a}`")), e.dataset.as_ref().map(|a| format!("dataset `{a}`")), e.optimizer_arg.as_ref().map(|a| format!("optimizer_args `{a}`"))]
                            .into_iter()
                            .flatten()
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                let mut when = Vec::new();
                if let Some(c) = &f.show_when {
                    when.push(format!("shown when {}", describe_condition(c)));
                }
                if let Some(c) = &f.disable_when {
                    when.push(format!("greyed when {}", describe_condition(c)));
                }
                if let Some(c) = &f.enable_when {
                    when.push(format!("greyed unless {}", describe_condition(c)));
                }
                for (fam, o) in &f.overrides {
                    let mut parts = Vec::new();
                    if let Some(d) = &o.default {
                        parts.push(format!("default {d}"));
                    }
                    if let Some(m) = o.min {
                        parts.push(format!("min {}", fmt_num(m)));
                    }
                    if let Some(m) = o.max {
                        parts.push(format!("max {}", fmt_num(m)));
                    }
                    if o.disabled == Some(true) {
                        parts.push("greyed".into());
                    }
                    if o.hidden == Some(true) {
                        parts.push("hidden".into());
                    }
                    when.push(format!("{fam}: {}", parts.join(", ")));
                }
                out.push_str(&format!(
                    "| `{}` | {} | {} | `{}` | {} | {} | {} | {} |\n",
                    f.key,
                    f.label,
                    f.kind.name(),
                    f.default,
                    bounds,
                    export,
                    when.join("; "),
                    f.help.replace('|', "\\|").replace('\n', " ")
                ));
            }
        }
        out
    }
}

fn describe_condition(c: &Condition) -> String {
    c.iter()
        .map(|(k, vs)| format!("`{k}` ∈ {{{}}}", vs.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")))
        .collect::<Vec<_>>()
        .join(" and ")
}

/// Formats a bound without a spurious ".0".
pub fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Equality that treats 1 and 1.0 as the same number.
pub fn values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn check_choice(choices: &[Choice], value: &Value) -> std::result::Result<(), String> {
    let Some(s) = value.as_str() else {
        return Err(format!("must be one of {}, got {value}", list_choices(choices)));
    };
    if choices.iter().any(|c| c.value == s) {
        Ok(())
    } else {
        Err(format!("`{s}` is not a choice; must be one of {}", list_choices(choices)))
    }
}

fn list_choices(choices: &[Choice]) -> String {
    choices.iter().map(|c| c.value.as_str()).collect::<Vec<_>>().join(", ")
}

/// Checks one value against a field's kind, bounds (when given) and choices.
fn check_value(field: &Field, value: &Value, min: Option<f64>, max: Option<f64>) -> std::result::Result<(), String> {
    let shown = |v: &Value| match v {
        Value::String(s) => format!("'{s}'"),
        other => other.to_string(),
    };
    match field.kind {
        Kind::Toggle => {
            if !value.is_boolean() {
                return Err(format!("must be on or off (true/false), got {}", shown(value)));
            }
        }
        Kind::Integer | Kind::Float => {
            let number = match value {
                Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
                _ => {
                    let what = if field.kind == Kind::Integer { "a whole number" } else { "a number" };
                    return Err(format!("must be {what}, got {}", shown(value)));
                }
            };
            if field.kind == Kind::Integer && !(value.is_i64() || value.is_u64()) {
                return Err(format!("must be a whole number, got {}", shown(value)));
            }
            if let Some(lo) = min {
                if number < lo {
                    return Err(format!("must be at least {} (got {})", fmt_num(lo), fmt_num(number)));
                }
            }
            if let Some(hi) = max {
                if number > hi {
                    return Err(format!("must be at most {} (got {})", fmt_num(hi), fmt_num(number)));
                }
            }
            if let (Some(step), Some(lo)) = (field.step, min) {
                if field.kind == Kind::Integer && step > 0.0 && ((number - lo) / step).fract().abs() > 1e-9 {
                    return Err(format!("must be a multiple of {} from {} (got {})", fmt_num(step), fmt_num(lo), fmt_num(number)));
                }
            }
        }
        Kind::Choice => return check_choice(&field.choices, value),
        Kind::Text | Kind::Path | Kind::Multiline => {
            let Some(s) = value.as_str() else {
                return Err(format!("must be text, got {}", shown(value)));
            };
            if field.kind != Kind::Multiline && s.contains('\n') {
                return Err("must be a single line".into());
            }
            if s.contains('\0') {
                return Err("must not contain a NUL character".into());
            }
        }
    }
    Ok(())
}
