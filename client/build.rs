include!("../scripts/build-info.rs");

fn main() {
    build_info();
}
