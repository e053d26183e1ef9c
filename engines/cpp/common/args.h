// Command-line parsing shared by icmoe_aoti and icmoe_trt.
//
//   ArgParser parser("icmoe_aoti", {"MODEL.pt2", "IMAGE", "MASK"}, "description ...");
//   add_run_options(parser);                       // --logits FILE, --repeat N: what both programs take
//   parser.option("--plugin", "LIB.so", "...", /*repeated=*/true);
//   Arguments args;
//   int exit_code;
//   if (!parse_command_line(parser, argc, argv, args, exit_code)) return exit_code;  // --help, no arguments
//   const RunArguments run = run_arguments(args);  // paths, --logits, --repeat, decoding limits, checked
//
// `--name VALUE` and `--name=VALUE` both work; `--` ends the options. `-h` / `--help` prints the help to
// stdout (exit code 0); an empty command line prints it to stderr (2). Every mistake throws UsageError
// with one line (an unknown option, a missing value, an option given twice, the wrong number of
// positional arguments, a mask name that is neither .png nor .pgm); the programs print it as
// "error: ..." and exit with 2. Numbers go through parse_count, which takes nothing but decimal digits
// ("abc", "-1", "1x", "" are errors, not 0).
#pragma once

#include <algorithm>
#include <cstdint>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "image_io.h"

namespace icmoe {

// A command-line mistake: the programs exit with 2 instead of 1.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Arguments {
  std::vector<std::string> positional;
  std::map<std::string, std::vector<std::string>> values;  // option name -> values, in order given
  bool help = false;

  bool has(const std::string& name) const { return values.count(name) > 0; }
  // The option's value, or `fallback` when it was not given.
  std::string get(const std::string& name, const std::string& fallback = "") const {
    const auto found = values.find(name);
    return found == values.end() ? fallback : found->second.back();
  }
  std::vector<std::string> all(const std::string& name) const {
    const auto found = values.find(name);
    return found == values.end() ? std::vector<std::string>{} : found->second;
  }
};

// "12" -> 12. Only decimal digits, at most `max`; `what` names the option in the message.
inline int64_t parse_count(const std::string& what, const std::string& text, int64_t max = 1000000) {
  bool digits = !text.empty() && text.size() <= 18;
  for (char c : text) digits = digits && c >= '0' && c <= '9';
  const int64_t value = digits ? std::stoll(text) : -1;
  if (!digits || value > max)
    throw UsageError(what + " expects a whole number 0.." + std::to_string(max) + ", got '" + text + "'");
  return value;
}

class ArgParser {
 public:
  ArgParser(std::string program, std::vector<std::string> positional, std::string description)
      : program_(std::move(program)), positional_(std::move(positional)), description_(std::move(description)) {}

  // An option with one value (`repeated`: may be given more than once, e.g. --plugin).
  void option(const std::string& name, const std::string& metavar, const std::string& help, bool repeated = false) {
    options_.push_back({name, metavar, help, repeated});
  }

  // "usage: prog A B C [--x X] ..." (one line).
  std::string usage() const {
    std::string s = "usage: " + program_;
    for (const auto& p : positional_) s += " " + p;
    for (const auto& o : options_) s += " [" + o.name + " " + o.metavar + "]" + (o.repeated ? "..." : "");
    return s + " [--help]";
  }

  // The usage line, the description and one line per option (what --help prints).
  std::string help() const {
    std::string s = usage() + "\n\n" + description_ + "\n\noptions:\n";
    for (const auto& o : options_) {
      std::string left = "  " + o.name + " " + o.metavar;
      left.resize(std::max<size_t>(left.size() + 2, 24), ' ');
      s += left + o.help + "\n";
    }
    return s + "  -h, --help            print this help and exit\n";
  }

  Arguments parse(int argc, char** argv) const {
    Arguments a;
    bool options_done = false;
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      if (options_done || arg.size() < 2 || arg[0] != '-') {
        a.positional.push_back(arg);
      } else if (arg == "--") {
        options_done = true;
      } else if (arg == "-h" || arg == "--help") {
        a.help = true;
      } else {
        i = take_option(a, arg, argc, argv, i);
      }
    }
    if (!a.help && a.positional.size() != positional_.size())
      throw UsageError("expected " + std::to_string(positional_.size()) + " arguments (" + join_positional() +
                       "), got " + std::to_string(a.positional.size()) + "; see " + program_ + " --help");
    return a;
  }

 private:
  struct Option {
    std::string name, metavar, help;
    bool repeated;
  };

  const Option& find(const std::string& name) const {
    for (const auto& o : options_)
      if (o.name == name) return o;
    throw UsageError("unknown option " + name + "; see " + program_ + " --help");
  }

  // Reads `--name VALUE` or `--name=VALUE` at argv[i]; returns the index of the last argument used.
  int take_option(Arguments& a, const std::string& arg, int argc, char** argv, int i) const {
    const size_t eq = arg.find('=');
    const Option& o = find(arg.substr(0, eq));
    std::string value;
    if (eq != std::string::npos) {
      value = arg.substr(eq + 1);
    } else if (i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0) {
      value = argv[++i];
    } else {
      throw UsageError(o.name + " needs a value (" + o.metavar + ")");
    }
    if (!o.repeated && a.has(o.name)) throw UsageError(o.name + " given twice");
    a.values[o.name].push_back(value);
    return i;
  }

  std::string join_positional() const {
    std::string s;
    for (size_t i = 0; i < positional_.size(); ++i) s += (i ? " " : "") + positional_[i];
    return s;
  }

  std::string program_;
  std::vector<std::string> positional_;
  std::string description_;
  std::vector<Option> options_;
};

// What both programs take: MODEL IMAGE MASK [--logits FILE] [--repeat N] [--upsample logits|nearest], and
// the decoding limits of the environment (ICMOE_MAX_IMAGE_PIXELS, ICMOE_MAX_DECODED_BYTES; decode_limits.h).
struct RunArguments {
  std::string model, image, mask, logits;
  int repeat = 0;
  DecodeLimits limits;
  std::string upsample = "logits";
};

inline void add_run_options(ArgParser& parser) {
  parser.option("--logits", "FILE", "also write the output named logits, raw float32 at the model's size");
  parser.option("--repeat", "N", "run N more times and print the mean latency");
  parser.option("--upsample", "HOW",
                "logits (default; with a mask rule: the logits resized bilinearly, then the rule) or nearest");
}

// The positional arguments and the options of add_run_options, checked before anything runs.
inline RunArguments run_arguments(const Arguments& args) {
  RunArguments r{args.positional.at(0), args.positional.at(1), args.positional.at(2), args.get("--logits"), 0, {},
                 args.get("--upsample", "logits")};
  r.repeat = static_cast<int>(parse_count("--repeat", args.get("--repeat", "0")));
  if (r.upsample != "logits" && r.upsample != "nearest")
    throw UsageError("--upsample must be logits or nearest, got '" + r.upsample + "'");
  try {
    mask_format(r.mask);
    r.limits = decode_limits();
  } catch (const std::exception& e) {
    throw UsageError(e.what());
  }
  return r;
}

// argv -> `args`, or false with `exit_code` set when the program should stop here: --help prints the help
// to stdout (0), an empty command line prints it to stderr (2). Mistakes throw UsageError.
inline bool parse_command_line(const ArgParser& parser, int argc, char** argv, Arguments& args, int& exit_code) {
  if (argc <= 1) {
    std::cerr << parser.help();
    exit_code = 2;
    return false;
  }
  args = parser.parse(argc, argv);
  if (args.help) {
    std::cout << parser.help();
    exit_code = 0;
    return false;
  }
  return true;
}

}  // namespace icmoe
