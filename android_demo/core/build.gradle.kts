// The app's logic as a plain Kotlin/JVM library (no Android dependency): bundle manifest verification,
// image preprocessing, prompt building, SentencePiece BPE, the decode loop, benchmark JSON.
// Here (no Android SDK, no Maven) it is built and tested by ./test.sh with Debian's kotlinc 1.3;
// the sources stay Kotlin 1.3-compatible so both toolchains compile them.
import org.jetbrains.kotlin.gradle.dsl.JvmTarget
import org.jetbrains.kotlin.gradle.tasks.KotlinCompile

plugins {
    id("org.jetbrains.kotlin.jvm")
    `java-library`
}

java {
    sourceCompatibility = JavaVersion.VERSION_1_8
    targetCompatibility = JavaVersion.VERSION_1_8
}

tasks.withType<KotlinCompile>().configureEach {
    compilerOptions.jvmTarget.set(JvmTarget.JVM_1_8)
}

dependencies {
    testImplementation("junit:junit:4.13.2")
}

tasks.test {
    // the shared test vectors written by `tests/export/helpers/export_vectors.py`
    systemProperty("vectors.dir", file("src/test/resources/vectors").absolutePath)
    testLogging { events("passed", "failed"); showStandardStreams = true }
}
