//! The knobs of the GPU benchmarks (`gpu_quantize` here, `gpu_a2a` in moe-a2a): comma-separated
//! lists in environment variables, such as `MOE_BENCH_TOKENS=128,4096`.

use moe_quant::QuantScheme;

/// The entries of environment variable `var`, a comma-separated list, each through `parse`, or
/// `default` when `var` is unset. An entry that `parse` refuses is an error naming the
/// variable, the entry and what `parse` wants instead.
pub fn env_list<T: Clone>(
    var: &str,
    default: &[T],
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    parse_list(var, std::env::var(var).ok().as_deref(), default, parse)
}

fn parse_list<T: Clone>(
    var: &str,
    value: Option<&str>,
    default: &[T],
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    match value {
        None => Ok(default.to_vec()),
        Some(list) => list
            .split(',')
            .map(str::trim)
            .map(|entry| parse(entry).map_err(|want| format!("{var} entry `{entry}`: {want}")))
            .collect(),
    }
}

/// A count of at least 1 (tokens per rank, ranks).
pub fn positive_count(entry: &str) -> Result<usize, String> {
    match entry.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("want a positive count".to_string()),
    }
}

/// A parser of the names of `schemes` (the ones a benchmark measures).
pub fn scheme_among(schemes: &[QuantScheme]) -> impl Fn(&str) -> Result<QuantScheme, String> + '_ {
    move |entry| {
        schemes.iter().copied().find(|s| s.name() == entry).ok_or_else(|| {
            let names: Vec<_> = schemes.iter().map(|s| s.name()).collect();
            format!("want one of {}", names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unset_list_is_the_default_and_a_set_one_is_parsed_entry_by_entry() {
        assert_eq!(parse_list("V", None, &[7usize], positive_count), Ok(vec![7]));
        assert_eq!(
            parse_list("V", Some("1, 128,4096"), &[7], positive_count),
            Ok(vec![1, 128, 4096])
        );
    }

    #[test]
    fn a_refused_entry_names_the_variable_the_entry_and_what_is_wanted() {
        assert_eq!(
            parse_list("MOE_BENCH_TOKENS", Some("128,0"), &[1usize], positive_count),
            Err("MOE_BENCH_TOKENS entry `0`: want a positive count".to_string())
        );
        let schemes = [QuantScheme::Bf16, QuantScheme::Nvfp4];
        assert_eq!(
            parse_list("MOE_BENCH_SCHEMES", Some("nvfp4,fp8"), &[], scheme_among(&schemes)),
            Err("MOE_BENCH_SCHEMES entry `fp8`: want one of bf16, nvfp4".to_string())
        );
        assert_eq!(
            parse_list("S", Some("nvfp4"), &[], scheme_among(&schemes)),
            Ok(vec![QuantScheme::Nvfp4])
        );
    }
}
