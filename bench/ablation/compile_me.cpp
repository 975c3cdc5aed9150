// A real translation unit for the "gcc" workload: templates, containers and streams
// make the compiler allocate the way it does on application code.
#include <algorithm>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

struct Record {
    std::string name;
    std::vector<int> values;
    std::map<std::string, double> attributes;
};

template <typename T> std::vector<T> sorted_unique(std::vector<T> v) {
    std::sort(v.begin(), v.end());
    v.erase(std::unique(v.begin(), v.end()), v.end());
    return v;
}

int main(int argc, char **argv) {
    std::vector<Record> records;
    std::unordered_map<std::string, std::shared_ptr<Record>> index;
    std::regex word("[a-z]+");
    for (int i = 0; i < argc * 100; i++) {
        Record r{"r" + std::to_string(i), {i, i * 2, i * 3}, {{"w", i * 0.5}}};
        records.push_back(r);
        index[r.name] = std::make_shared<Record>(r);
    }
    std::set<std::string> names;
    for (auto &r : records) names.insert(r.name);
    std::ostringstream out;
    out << names.size() << " " << sorted_unique(std::vector<int>{3, 1, 2, 3}).size();
    std::string s = out.str();
    std::function<int(int)> fib = [&](int n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); };
    std::cout << s << " " << fib(10) << " " << std::regex_search(argv[0], word) << "\n";
    return 0;
}
