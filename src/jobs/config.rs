//! From a registry configuration to the engine's typed [`TrainConfig`]: the one conversion the
//! queue, the workers and `loft train` share.

use loft_worker::train::TrainConfig;

use crate::registry::{Config, FieldError, Registry};

/// Validates a configuration (sparse or resolved) against the registry, applies its linked
/// toggles, resolves it, keeps only the *active* fields (shown and not greyed: an inactive value
/// means "not used" and must not reach the engine) and reads it into a [`TrainConfig`]. Every
/// problem names its field: registry errors (bounds, choices, cross-field checks) first; only a
/// configuration the registry accepts is checked by the engine (options it does not support yet,
/// required paths).
pub fn engine_config(registry: &Registry, config: &Config) -> Result<TrainConfig, Vec<FieldError>> {
    let active = validated_active(registry, config)?;
    TrainConfig::from_map(&active).map_err(|errors| errors.into_iter().map(|e| FieldError { field: e.field, message: e.message }).collect())
}

/// A configuration with its linked toggles applied, validated (errors name their fields),
/// resolved, and cut to its active fields: what training and the sd-scripts export read.
pub fn validated_active(registry: &Registry, config: &Config) -> Result<Config, Vec<FieldError>> {
    let mut config = config.clone();
    registry.apply_links(&mut config, &[]);
    let errors = registry.validate(&config);
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(active_config(registry, &registry.resolve(&config)))
}

/// The active fields of a resolved configuration.
pub fn active_config(registry: &Registry, resolved: &Config) -> Config {
    resolved
        .iter()
        .filter(|(key, _)| registry.field(key).is_some_and(|f| registry.is_active(f, resolved)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(v: serde_json::Value) -> Config {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn drops_inactive_fields_and_names_problems() {
        let registry = Registry::embedded().unwrap();
        let base = json!({
            "pretrained_model_name_or_path": "/models/x", "train_data_dir": "/data/x", "output_dir": "/out",
            "network_algo": "lora", "factor": 8
        });
        // `factor` is a LoKr option: hidden for LoRA, so the engine never sees it.
        let c = engine_config(&registry, &config(base.clone())).unwrap();
        assert_eq!(c.network_algo, loft_worker::networks::NetworkAlgo::Lora);
        assert_eq!(c.factor, loft_worker::train::TrainConfig::default().factor);

        let mut lokr = base.clone();
        lokr["network_algo"] = json!("lokr");
        assert_eq!(engine_config(&registry, &config(lokr)).unwrap().factor, 8);

        // A registry problem names the field.
        let mut bad = base.clone();
        bad["network_dim"] = json!(-3);
        let errors = engine_config(&registry, &config(bad)).unwrap_err();
        assert!(errors.iter().any(|e| e.field == "network_dim"), "{errors:?}");

        // An engine problem (a required path) names the field too.
        let errors = engine_config(&registry, &config(json!({"pretrained_model_name_or_path": "/m", "output_dir": "/o"}))).unwrap_err();
        assert!(errors.iter().any(|e| e.field == "train_data_dir"), "{errors:?}");
    }
}
