// icmoe_aoti: run an IC-MoE AOTInductor package (.pt2) on the CPU with libtorch, one image -> mask.
//
//   icmoe_aoti MODEL.pt2 IMAGE.ppm MASK.pgm [--logits LOGITS.f32] [--repeat N]
//
// MODEL.pt2 comes from `python -m engines.cpp.aoti` (torch._inductor.aoti_compile_and_package of
// images -> (logits, mask, expert)). IMAGE is a binary PPM/PGM of the model's size (the package's
// metadata says which); MASK is written as a binary PGM (0/255). --logits also writes the fused logits
// as raw float32 (S*S values), --repeat N times N runs and prints the mean latency.
// Errors: one line "error: ..." on stderr and exit code 1.
// ATen and the package loader only (not torch/torch.h): a fraction of the compile time.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "image_io.h"

namespace {

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

int usage() {
  std::cerr << "usage: icmoe_aoti MODEL.pt2 IMAGE.ppm MASK.pgm [--logits LOGITS.f32] [--repeat N]\n";
  return 2;
}

int run(int argc, char** argv) {
  std::vector<std::string> positional;
  std::string logits_path;
  int repeat = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--logits" && i + 1 < argc) {
      logits_path = argv[++i];
    } else if (arg == "--repeat" && i + 1 < argc) {
      repeat = std::atoi(argv[++i]);
    } else if (arg == "-h" || arg == "--help") {
      return usage();
    } else if (!arg.empty() && arg[0] == '-') {
      throw std::runtime_error("unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 3) return usage();
  const std::string& model_path = positional[0];
  const std::string& image_path = positional[1];
  const std::string& mask_path = positional[2];

  const icmoe::Image image = icmoe::read_pnm(image_path);  // (3, H, W) float32 0..255

  c10::InferenceMode inference_mode;
  torch::inductor::AOTIModelPackageLoader loader(model_path);
  const auto metadata = loader.get_metadata();
  const auto found = metadata.find("icmoe.image_size");
  if (found == metadata.end())
    throw std::runtime_error(model_path + ": not an IC-MoE package (no icmoe.image_size metadata)");
  const int size = std::stoi(found->second);
  if (image.width != size || image.height != size)
    throw std::runtime_error(image_path + ": image is " + std::to_string(image.width) + "x" +
                             std::to_string(image.height) + ", this model takes " + std::to_string(size) + "x" +
                             std::to_string(size));

  // (1, 3, S, S) float32 RGB 0..255: the model normalises inside, like every engine of the project.
  at::Tensor input = at::from_blob(const_cast<float*>(image.chw.data()), {1, 3, size, size}, at::kFloat).clone();
  std::vector<at::Tensor> outputs = loader.run({input});
  if (outputs.size() != 3) throw std::runtime_error(model_path + ": expected 3 outputs (logits, mask, expert)");
  const at::Tensor logits = outputs[0].contiguous();                    // (1, 1, S, S) float32
  const at::Tensor mask = outputs[1].to(at::kByte).contiguous();    // (1, 1, S, S) uint8
  const int expert = outputs[2].to(at::kInt).item<int>();          // (1,) int32

  icmoe::write_pgm(mask_path, mask.data_ptr<uint8_t>(), size, size);
  if (!logits_path.empty())
    icmoe::write_raw(logits_path, logits.data_ptr<float>(), static_cast<size_t>(logits.numel()) * sizeof(float));
  std::cout << "expert " << expert << "\nforeground " << mask.sum().item<int64_t>() << " of " << mask.numel()
            << " pixels\nmask " << mask_path << "\n";

  if (repeat > 0) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < repeat; ++i) loader.run({input});
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    std::cout << "latency " << ms / repeat << " ms (mean of " << repeat << ")\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const c10::Error& e) {
    std::cerr << "error: " << first_line(e.what_without_backtrace()) << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << first_line(e.what()) << "\n";
  }
  return 1;
}
