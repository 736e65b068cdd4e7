//! Debug aid: dumps last-token logits for batched and token-by-token runs of a prompt.
use kvinfer_model::Model;
use std::io::Write;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = Model::load(std::path::Path::new(&args[1])).unwrap();
    let n: usize = args[2].parse().unwrap();
    let ids: Vec<u32> = (0..n).map(|i| (i * 37 % 250) as u32 + 4).collect();
    let mut kv = model.new_kv_cache(128);
    let a = model.forward(&ids, &mut kv).unwrap();
    let mut kv2 = model.new_kv_cache(128);
    let mut b = vec![];
    for &t in &ids {
        b = model.forward(&[t], &mut kv2).unwrap();
    }
    let mut f = std::fs::File::create(&args[3]).unwrap();
    for (x, y) in a.iter().zip(&b) {
        writeln!(f, "{x} {y}").unwrap();
    }
}
